# The project's pillar, merged over the global one: `message` wins, `title` is inherited.
site:
  message: Hello from the site project

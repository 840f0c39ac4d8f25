# The global pillar: every image and project sees it; a project's pillar is merged over it.
admin:
  user: ops
site:
  title: sysbake example
  owner: platform team
  message: Hello from the global pillar (a project pillar overrides this)

# Which pillar files each machine sees.
base:
  '*':
    - site

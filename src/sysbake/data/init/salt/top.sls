# Which states apply to which machine; a baked image is always the one minion.
base:
  '*':
    - site

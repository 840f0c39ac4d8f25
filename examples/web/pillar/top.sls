base:
  '*':
    - global

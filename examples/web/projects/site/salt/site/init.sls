# The site project: nginx serving one page whose text comes from the project's pillar.
nginx:
  pkg.installed: []
  service.running:
    - enable: True
    - require:
      - pkg: nginx
    - watch:
      - file: /var/www/html/index.html

/var/www/html/index.html:
  file.managed:
    - contents: |
        <!doctype html>
        <title>{{ pillar['site']['title'] }}</title>
        <p>{{ pillar['site']['message'] }}</p>
    - require:
      - pkg: nginx

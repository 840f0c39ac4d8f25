# nginx serving one page. The page's text comes from the pillar (pillar/site.sls), so it can
# change without touching the states.
nginx:
  pkg.installed: []
  service.running:
    - enable: True
    - require:
      - pkg: nginx

/var/www/html/index.html:
  file.managed:
    - source: salt://site/index.html.jinja
    - template: jinja
    - user: root
    - group: root
    - mode: "0644"
    - require:
      - pkg: nginx

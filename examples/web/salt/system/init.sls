# System level: an operator account, the tools every host gets, and a small service.
{% set admin = pillar.get('admin', {}) %}

base-packages:
  pkg.installed:
    - pkgs:
      - curl
      - less

{{ admin.get('user', 'ops') }}:
  user.present:
    - shell: /bin/bash
    - home: /home/{{ admin.get('user', 'ops') }}
    - createhome: True

/etc/motd:
  file.managed:
    - contents: "{{ pillar.get('site', {}).get('title', 'a sysbake host') }} (owner: {{ pillar.get('site', {}).get('owner', 'nobody') }})\n"

/etc/systemd/system/sysbake-heartbeat.service:
  file.managed:
    - contents: |
        [Unit]
        Description=Log a heartbeat (sysbake example)
        [Service]
        Type=oneshot
        ExecStart=/bin/echo "heartbeat from {{ pillar.get('site', {}).get('title', 'host') }}"

/etc/systemd/system/sysbake-heartbeat.timer:
  file.managed:
    - contents: |
        [Unit]
        Description=Heartbeat every minute (sysbake example)
        [Timer]
        OnBootSec=10s
        OnUnitActiveSec=1min
        [Install]
        WantedBy=timers.target

sysbake-heartbeat.timer:
  service.running:
    - enable: True
    - watch:
      - file: /etc/systemd/system/sysbake-heartbeat.timer
      - file: /etc/systemd/system/sysbake-heartbeat.service

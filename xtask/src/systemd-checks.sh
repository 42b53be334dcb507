#!/bin/bash
# The systemd VM's checks (xtask/src/systemd_vm.rs boots them; shellcheck
# runs on this file before each boot).
# The sh -c '...' bodies expand in the inner shell, on purpose:
# shellcheck disable=SC2016
exec > /dev/ttyS0 2>&1 < /dev/null
export DEBIAN_FRONTEND=noninteractive
PS4='+ [$SECONDS s] '
set -x
fail=0
# A failed check prints the daemon's last 40 journal lines: what it did is
# what tells a product bug from a check that waited on the wrong thing.
check() {
  local what="$1"; shift
  if "$@"; then echo "LG-SYSTEMD-CHECK ok $what"; return; fi
  echo "LG-SYSTEMD-CHECK FAIL $what"
  fail=1
  echo "--- journalctl -u loopguard (last 40 lines) ---"
  journalctl -u loopguard -n 40 --no-pager -o short-monotonic
  echo "--- end of journal ---"
}
# Polls a condition for up to 30 s (software emulation is slow).
until_true() { local n=0; until "$@"; do n=$((n+1)); [ "$n" -gt 300 ] && return 1; sleep 0.1; done; }
# The policy file on disk is the one in force (status reports its hash).
in_force() { /usr/sbin/loopguard status --format json 2>/dev/null | grep -Fq "\"policy_hash\": \"sha256:$(sha256sum /etc/loopguard/policy.toml | cut -d' ' -f1)\""; }
# `systemctl reload` only sends SIGHUP (ExecReload=kill -HUP) and returns at
# once: wait until the edit is in force before probing what it changed.
reload() { systemctl reload loopguard && until_true in_force; }
probe_as() { /usr/local/bin/lg-probe --uid "$(id -u "$1")" --gid "$(id -g "$1")" tcp-to 127.0.0.1:7031; }
says() { [ "$(probe_as "$1")" = "$2" ]; }
links() { find /sys/fs/bpf/loopguard/links -mindepth 1 -printf '%i %f\n' 2>/dev/null | sort; }
stopped_and_pinned() { ! systemctl is-active --quiet loopguard && [ -n "$(links)" ]; }
adopted() { systemctl is-active --quiet loopguard && [ "$(links)" = "$before" ]; }
echo "LG-SYSTEMD booted $(uname -r), $(systemctl --version | head -1)"
useradd --system --no-create-home lgt-app
useradd --system --no-create-home lgt-mallory
/usr/local/bin/lg-probe listen 7031 &

check "dpkg -i installs the package" timeout 300 dpkg -i /root/loopguard.deb
check "man page and completion in place" test -e /usr/share/man/man8/loopguard-apply.8.gz -a -e /usr/share/bash-completion/completions/loopguard
check "the shipped policy is a conffile that guards nothing" sh -c '/usr/sbin/loopguard check /etc/loopguard/policy.toml && grep -q /etc/loopguard/policy.toml /var/lib/dpkg/info/loopguard.conffiles'
cat > /etc/loopguard/policy.toml <<'EOF'
version = 1
log_allowed = true
[[service]]
name = "db"
port = 7031
allow_users = ["root", "lgt-app"]
EOF

# Metrics for a real Prometheus, which evaluates the shipped alert rules.
mkdir -p /etc/systemd/system/loopguard.service.d
printf '[Service]\nExecStart=\nExecStart=/usr/sbin/loopguard run /etc/loopguard/policy.toml --metrics 127.0.0.1:9477\n' > /etc/systemd/system/loopguard.service.d/metrics.conf
systemctl daemon-reload
cat > /etc/prometheus/prometheus.yml <<'EOF'
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: [/usr/share/loopguard/prometheus/loopguard.rules.yml]
scrape_configs:
  - job_name: loopguard
    static_configs: [{targets: ['127.0.0.1:9477']}]
EOF
systemctl restart prometheus
# Whether Prometheus has alert $1 firing (its HTTP API, read with python3).
firing() {
  /usr/local/bin/lg-probe http 127.0.0.1:9090 /api/v1/alerts | python3 -c '
import json, sys
alerts = json.load(sys.stdin)["data"]["alerts"]
sys.exit(not any(a["labels"]["alertname"] == sys.argv[1] and a["state"] == "firing" for a in alerts))' "$1" 2>/dev/null
}
# Polls a condition for up to two minutes (Prometheus starts slowly here).
until_long() { local n=0; until "$@"; do n=$((n+1)); [ "$n" -gt 120 ] && return 1; sleep 1; done; }

systemctl start loopguard
check "systemctl start reaches active through Type=notify" sh -c 'systemctl is-active --quiet loopguard && [ "$(systemctl show -p Type --value loopguard)" = notify ]'
check "a listed user gets through" says lgt-app connect=ok
check "a denied user is refused" says lgt-mallory connect=EPERM

sed -i 's/"root", "lgt-app"/"root", "lgt-app", "lgt-mallory"/' /etc/loopguard/policy.toml
check "systemctl reload applies an edit" reload
check "and lets the user through" until_true says lgt-mallory connect=ok
sed -i 's/, "lgt-mallory"//' /etc/loopguard/policy.toml
check "the edit back is applied" reload
check "and refuses the user again" until_true says lgt-mallory connect=EPERM
check "the refusal is in the journal as a warning" until_true sh -c 'journalctl -u loopguard -p warning -o cat | grep -q "\"event.action\":\"deny\""'
check "allowed attempts are there at info, not at warning" sh -c 'journalctl -u loopguard -p info -o cat | grep -q "\"event.action\":\"allow\"" && ! journalctl -u loopguard -p warning -o cat | grep -q "\"event.action\":\"allow\""'

before="$(links)"
systemctl stop loopguard
check "systemctl stop leaves enforcement pinned" stopped_and_pinned
check "and enforced" says lgt-mallory connect=EPERM
systemctl start loopguard
check "systemctl start again adopts the pins (the same links)" adopted
check "still enforced" says lgt-mallory connect=EPERM
check "loopguard remove while the unit runs is refused" sh -c '! /usr/sbin/loopguard remove 2>/root/remove.err && grep -q "loopguard run. (pid" /root/remove.err'
check "and enforcement stays" says lgt-mallory connect=EPERM

# From boot, as a reboot leaves the host: the kernel's objects and /run
# gone, /var/lib (the last known good) kept; then the unit starts.
boot_with() {
  systemctl stop loopguard
  rm -rf /sys/fs/bpf/loopguard /run/loopguard/loopguard
  nft delete table inet loopguard 2>/dev/null || true
  "$@"
  systemctl start loopguard
}
cp /etc/loopguard/policy.toml /root/good.toml
boot_with sed -i 's/port = 7031/port = 99999/' /etc/loopguard/policy.toml
check "from boot with a broken policy file: the unit runs" systemctl is-active --quiet loopguard
check "and enforces the last known good policy" says lgt-mallory connect=EPERM
check "and says so" sh -c 'journalctl -u loopguard -o cat | grep -q "enforcing the last known good policy"'
check "status says the file is not the policy in force" sh -c '/usr/sbin/loopguard status | grep -q "the policy file changed since it was applied"'
check "Prometheus fires LoopguardOnLastKnownGood from the shipped rules" until_long firing LoopguardOnLastKnownGood
boot_with sed -i 's/port = 99999/port = 7031/; s/"root", "lgt-app"/"root", "lgt-app", "lgt-later"/' /etc/loopguard/policy.toml
check "from boot with a name that does not resolve yet: the unit runs" systemctl is-active --quiet loopguard
check "the rest is enforced" says lgt-mallory connect=EPERM
check "and a listed user gets through" says lgt-app connect=ok
check "the daemon says the name admits nobody yet" sh -c 'journalctl -u loopguard -o cat | grep -q "user lgt-later does not resolve: on an allow-list it admits nobody"'
useradd --system --no-create-home lgt-later
check "the name is enforced once it resolves" until_true says lgt-later connect=ok
cp /root/good.toml /etc/loopguard/policy.toml
check "the good policy again" reload

# A unit by name (allow_units): its processes get through whatever their
# uid, from a cgroup that did not exist when the policy was applied, and
# again after the unit runs anew (a new cgroup at the same path).
sed -i 's/allow_users = \["root", "lgt-app"\]/allow_users = ["root", "lgt-app"]\nallow_units = ["lg-client.service"]/' /etc/loopguard/policy.toml
check "the policy with allow_units is in force" reload
client() { systemd-run --quiet --wait --pipe --unit=lg-client -p User=lgt-mallory /bin/bash -c 'for i in $(seq 100); do r=$(/usr/local/bin/lg-probe tcp-to 127.0.0.1:7031 2>/dev/null); [ "$r" = connect=ok ] && break; sleep 0.1; done; echo "$r"'; }
client_ok() { [ "$(client)" = connect=ok ]; }
check "allow_units: the unit's processes get through" client_ok
check "allow_units: and again when the unit runs anew" client_ok
check "allow_units: the same user outside the unit is refused" says lgt-mallory connect=EPERM
# Between runs the unit has no cgroup: explain says so.
check "explain --unit names the unit's cgroup" sh -c 'loopguard explain --uid "$(id -u lgt-mallory)" --unit lg-client.service --to 127.0.0.1:7031 | grep -q "cgroup system.slice/lg-client.service"'
# What matters: while the unit runs, its current cgroup id is the one the
# kernel holds (explain --unit matches only ids in force), and the daemon
# said it followed it, in either of its words for that.
systemd-run --quiet --unit=lg-client -p User=lgt-mallory /bin/sleep 300
enforced_now() { /usr/sbin/loopguard explain --uid "$(id -u lgt-mallory)" --unit lg-client.service --to 127.0.0.1:7031 | head -1 | grep -q '^allow'; }
check "allow_units: the running unit's current cgroup is the one enforced" until_true enforced_now
check "the daemon said it followed the unit's cgroup" until_true sh -c 'journalctl -u loopguard -o cat | grep -Eq "cgroup system.slice/lg-client.service of service db (exists now|was made again)"'
# In which words, for the record (issue 31: only "exists now" was waited for).
journalctl -u loopguard -o cat | grep "lg-client.service of service" | sed 's/^/LG-SYSTEMD-INFO /'
systemctl stop lg-client

score="$(systemd-analyze security loopguard --no-pager 2>&1 | grep -i 'overall exposure')"
echo "LG-SYSTEMD-SECURITY $score"
exposure="$(echo "$score" | grep -o '[0-9]*\.[0-9]' | head -1)"
check "systemd-analyze security: exposure 5.0 or less" awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 5.0) }'
check "loopguard neither failed nor restarted" sh -c '! systemctl is-failed --quiet loopguard && [ "$(systemctl show -p NRestarts --value loopguard)" = 0 ]'

rm -r /etc/systemd/system/loopguard.service.d
systemctl daemon-reload
dpkg -P loopguard >/dev/null
check "dpkg -P leaves no pins" test ! -e /sys/fs/bpf/loopguard
check "dpkg -P leaves no table" sh -c '! nft list tables | grep -q loopguard'
check "dpkg -P leaves no files" sh -c '! ls /etc/loopguard /usr/sbin/loopguard /run/loopguard /var/log/loopguard /var/lib/loopguard 2>/dev/null | grep -q .'
check "and enforcement is lifted" says lgt-mallory connect=ok
# The Ansible role (deploy/ansible), as a fleet rollout would run it.
play() { ansible-playbook -c local -i localhost, /root/ansible/site.yml -e loopguard_deb=/root/loopguard.deb -e "@$1" "${@:2}"; }
services() { printf '{"loopguard_services": [{"name": "db", "port": %s, "allow_users": [%s]}]}' "$1" "$2" > "/root/$3.json"; }
services 7031 '"root", "lgt-app"' v1
services 7031 '"root", "lgt-app", "lgt-mallory"' v2
services 99999 '"root"' broken
check "ansible: the role installs, templates and starts" play /root/v1.json
check "ansible: the daemon runs the templated policy" sh -c 'systemctl is-active --quiet loopguard && grep -q lgt-app /etc/loopguard/policy.toml'
check "ansible: enforced" until_true says lgt-mallory connect=EPERM
check "ansible: --check --diff succeeds" sh -c 'ansible-playbook -c local -i localhost, /root/ansible/site.yml -e loopguard_deb=/root/loopguard.deb -e @/root/v2.json --check --diff > /root/check.out 2>&1 || { tail -n 40 /root/check.out; false; }'
check "ansible: --check --diff shows loopguard diff" grep -q "user lgt-mallory gains access" /root/check.out
check "ansible: --check changes nothing" sh -c '! grep -q lgt-mallory /etc/loopguard/policy.toml'
play /root/v2.json
check "ansible: the new policy is enforced after the handler's reload" until_true says lgt-mallory connect=ok
check "ansible: a policy that fails loopguard check is not installed" sh -c '! ansible-playbook -c local -i localhost, /root/ansible/site.yml -e loopguard_deb=/root/loopguard.deb -e @/root/broken.json > /root/broken.out 2>&1 && grep -q "port 99999 is out of range" /root/broken.out'
check "ansible: and the one in force stays" sh -c 'grep -q "port = 7031" /etc/loopguard/policy.toml'
check "ansible: still enforced" says lgt-mallory connect=ok
dpkg -P loopguard >/dev/null
echo "LOOPGUARD-VM-RESULT rc=$fail"
echo 1 > /proc/sys/kernel/sysrq
echo o > /proc/sysrq-trigger

# portico %post: the certificate directory (private keys: readable by the service's
# group only) and conf.d, then enable (never start) the unit on first install. Works
# without a running systemd (containers, image builds): `systemctl enable` only writes
# symlinks then, and daemon-reload is skipped.
mkdir -p /etc/portico/certs /etc/portico/conf.d
chown root:portico /etc/portico/certs
chmod 0750 /etc/portico/certs
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload enable portico.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0

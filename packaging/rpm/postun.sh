# portico %postun: reload systemd; on upgrade, restart the service if it was running so
# the new binary serves (a restart drains in-flight requests for mesh.drainDuration).
# On erase, edited config files are kept as .rpmsave, certificates and the portico user
# stay; directories are removed only if empty.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart portico.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 0 ]; then
    rmdir /etc/portico/certs /etc/portico/conf.d /etc/portico 2>/dev/null || :
fi
exit 0

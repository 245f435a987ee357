# portico %preun: on erase (not upgrade), stop and disable the unit.
if [ "$1" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload disable portico.service >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        systemctl stop portico.service >/dev/null 2>&1 || :
    fi
fi
exit 0

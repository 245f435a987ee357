# portico %pre: the unprivileged system user the service runs as (the same user as
# /usr/lib/sysusers.d/portico.conf describes).
getent group portico >/dev/null || groupadd -r portico
getent passwd portico >/dev/null || \
    useradd -r -g portico -d /var/lib/portico -M -s /sbin/nologin \
        -c "Portico edge gateway" portico
exit 0

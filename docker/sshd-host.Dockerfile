# A rented container instance stand-in for tests: sshd, python3, coreutils and proot, no Docker.
# Root logs in with a key only; the user `runner` may log in with a password the test sets.
# The host key, root's authorized key and the password arrive as environment variables when
# the container starts, so every container can have its own host key without a rebuild.
ARG BASE=runner-base/bookworm:minbase
FROM ${BASE}

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      openssh-server python3 coreutils procps proot \
 && rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_* \
 && mkdir -p /run/sshd /root/.ssh \
 && chmod 700 /root/.ssh \
 && useradd --create-home --shell /bin/sh runner

RUN printf '%s\n' \
      'HostKey /etc/ssh/ssh_host_ed25519_key' \
      'PermitRootLogin prohibit-password' \
      'PasswordAuthentication yes' \
      'KbdInteractiveAuthentication no' \
      'UsePAM no' \
      'MaxStartups 50' \
      'PrintMotd no' \
      > /etc/ssh/sshd_config.d/test-host.conf \
 && printf '%s\n' \
      '#!/bin/sh' \
      'set -eu' \
      'umask 077' \
      'printf "%s\n" "$SSHD_HOST_KEY" > /etc/ssh/ssh_host_ed25519_key' \
      'printf "%s\n" "$SSHD_AUTHORIZED_KEY" > /root/.ssh/authorized_keys' \
      'if [ -n "${SSHD_USER_PASSWORD:-}" ]; then echo "runner:$SSHD_USER_PASSWORD" | chpasswd; fi' \
      'exec /usr/sbin/sshd -D -e' \
      > /usr/local/sbin/sshd-host \
 && chmod 755 /usr/local/sbin/sshd-host

EXPOSE 22
CMD ["/usr/local/sbin/sshd-host"]

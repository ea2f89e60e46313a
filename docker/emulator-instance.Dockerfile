# An AutoDL-style container instance for the local emulator (infra/emulator): sshd, python3,
# coreutils, procps and proot, and no Docker inside, as on AutoDL. Root logs in with a password.
# The emulator copies /etc/autodl-boot/{mode,root_password} into the stopped container before
# each boot; the init script applies them, so one image serves every instance and mode.
# The host key is generated on the first boot and kept on the container's disk afterwards.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      openssh-server python3 coreutils procps proot \
 && rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_* \
 && mkdir -p /run/sshd /root/autodl-tmp /etc/autodl-boot

RUN printf '%s\n' \
      'PermitRootLogin yes' \
      'PasswordAuthentication yes' \
      'KbdInteractiveAuthentication no' \
      'UsePAM no' \
      'MaxStartups 100:30:200' \
      'PrintMotd no' \
      > /etc/ssh/sshd_config.d/autodl-emulator.conf \
 && printf '%s\n' \
      '#!/bin/sh' \
      '# PID 1 of an emulated instance: apply the boot settings, then become sshd.' \
      'set -eu' \
      'trap "exit 0" TERM' \
      'umask 022' \
      'mkdir -p /run/sshd /root/autodl-tmp' \
      'ssh-keygen -A >/dev/null' \
      'cp /etc/autodl-boot/mode /etc/autodl-mode' \
      'if [ -s /etc/autodl-boot/root_password ]; then' \
      '  printf "root:%s\n" "$(cat /etc/autodl-boot/root_password)" | chpasswd' \
      '  rm -f /etc/autodl-boot/root_password' \
      'fi' \
      'exec /usr/sbin/sshd -D -e' \
      > /usr/local/sbin/autodl-init \
 && printf '%s\n' \
      '#!/bin/sh' \
      '# As on AutoDL, shutting down from inside powers the instance off: PID 1 (sshd) exits.' \
      'kill -TERM 1' \
      > /usr/local/sbin/autodl-poweroff \
 && chmod 755 /usr/local/sbin/autodl-init /usr/local/sbin/autodl-poweroff \
 && for name in /usr/bin/shutdown /sbin/shutdown /sbin/poweroff /usr/sbin/poweroff /usr/bin/poweroff; do \
      rm -f "$name"; ln -s /usr/local/sbin/autodl-poweroff "$name"; \
    done

EXPOSE 22
CMD ["/usr/local/sbin/autodl-init"]

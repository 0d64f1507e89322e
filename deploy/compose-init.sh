#!/usr/bin/env bash
# Prepare deploy/ for docker compose on ONE demo host: consortium CA, a server certificate for
# the compose service name `server`, one key pair per hospital, phantom data for three
# hospitals, and the folders the containers write. In a real consortium each hospital runs
# `fedscan certs site` itself and sends only the .pub file, and ca/ (with ca.key) lives
# offline with the operator: no container ever mounts it.
set -euo pipefail
cd "$(dirname "$0")"
umask 077                              # keys 600 and folders 700 from the first byte
fedscan certs ca --out ca              # ca/ca.crt, ca/ca.key: never mounted into a container
fedscan certs server --ca ca --host server --out server-tls   # server.pem, server.key, ca.crt
for site in site-a site-b site-c; do fedscan certs site --name "$site" --out keys; done
fedscan phantoms --out data            # data/site-a, data/site-b, data/site-c (+ heldout)
mkdir -p runs state/site-a state/site-b state/site-c
# The containers run as you (compose reads .env), so the keys stay mode 600 and yours:
# nothing is made readable to other users.
printf 'FEDSCAN_UID=%s\nFEDSCAN_GID=%s\n' "$(id -u)" "$(id -g)" > .env
echo "ready: docker compose -f deploy/docker-compose.yml up --build"

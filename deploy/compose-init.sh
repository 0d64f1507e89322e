#!/usr/bin/env bash
# Prepare deploy/ for docker compose on ONE demo host: consortium CA, a server certificate for
# the compose service name `server`, one key pair per hospital, and phantom data for three
# hospitals. In a real consortium each hospital runs `fedscan certs site` itself and sends
# only the .pub file; ca.key never leaves the operator.
set -euo pipefail
cd "$(dirname "$0")"
fedscan certs ca --out certs
fedscan certs server --ca certs --host server
for site in site-a site-b site-c; do fedscan certs site --name "$site" --out keys; done
fedscan phantoms --out data           # data/site-a, data/site-b, data/site-c (+ heldout)
# The containers run as uid 49999 (see Dockerfile). Demo only: make the mounted files
# readable to it. On real hosts: chown 49999 the key file and keep it mode 600.
chmod 644 certs/ca.crt certs/server.pem certs/server.key keys/*
echo "ready: docker compose -f deploy/docker-compose.yml up --build"

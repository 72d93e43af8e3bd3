#!/usr/bin/env bash
# Make a private CA and the certificates a TLS etcd cluster and its rdzv clients need.
#
# Usage: deploy/gen-certs.sh [OUT_DIR] [SAN ...]
#   OUT_DIR  where to write (default: deploy/certs)
#   SAN      extra names for the server certificate: DNS:name, IP:addr, or a bare name/address
#
# Writes (PEM, EC P-256 keys, mode 0600):
#   ca.crt ca.key          the CA; kept and reused when OUT_DIR already has one
#   server.crt server.key  etcd members, for client and peer URLs (serverAuth + clientAuth);
#                          SANs: etcd-1 etcd-2 etcd-3 localhost 127.0.0.1 and the SAN arguments
#   client.crt client.key  rdzv clients (CN from $CLIENT_CN, default rdzv-client)
#
# Env: CA_CN (default rdzv-etcd-ca), CLIENT_CN, DAYS (leaf validity, default 825).
# With etcd's --client-cert-auth, any client with a cert signed by this CA is let in; when auth
# is on as well, etcd uses the cert's CN as the user name unless a user/password is given.
set -euo pipefail

OUT=${1:-"$(dirname "$0")/certs"}
shift || true
CA_CN=${CA_CN:-rdzv-etcd-ca}
CLIENT_CN=${CLIENT_CN:-rdzv-client}
DAYS=${DAYS:-825}

command -v openssl >/dev/null || { echo "gen-certs: openssl is required" >&2; exit 1; }
mkdir -p "$OUT"
umask 077
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

sans="DNS:etcd-1,DNS:etcd-2,DNS:etcd-3,DNS:localhost,IP:127.0.0.1"
for san in "$@"; do
    case "$san" in
        DNS:*|IP:*) ;;
        *[!0-9.]*) case "$san" in *:*) san="IP:$san" ;; *) san="DNS:$san" ;; esac ;;
        *) san="IP:$san" ;;
    esac
    sans="$sans,$san"
done

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
serial() { echo "0x$(openssl rand -hex 16)"; }

if [ ! -s "$OUT/ca.crt" ] || [ ! -s "$OUT/ca.key" ]; then
    newkey "$OUT/ca.key"
    openssl req -x509 -new -key "$OUT/ca.key" -subj "/CN=$CA_CN" -days 3650 -sha256 \
        -set_serial "$(serial)" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$OUT/ca.crt"
fi

# leaf NAME CN EXTENDED_KEY_USAGE [SANS]
leaf() {
    local name=$1 cn=$2 eku=$3 alt=${4:-}
    newkey "$OUT/$name.key"
    openssl req -new -key "$OUT/$name.key" -subj "/CN=$cn" -out "$WORK/$name.csr"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$eku"
        echo "authorityKeyIdentifier=keyid"
        [ -z "$alt" ] || echo "subjectAltName=$alt"
    } >"$WORK/$name.ext"
    openssl x509 -req -in "$WORK/$name.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" \
        -set_serial "$(serial)" -days "$DAYS" -sha256 -extfile "$WORK/$name.ext" \
        -out "$OUT/$name.crt" 2>/dev/null
}

leaf server etcd "serverAuth,clientAuth" "$sans"
leaf client "$CLIENT_CN" "clientAuth"
chmod 0644 "$OUT"/*.crt
echo "gen-certs: wrote $OUT/{ca,server,client}.{crt,key} (server SANs: $sans)"

#!/bin/sh
# Regenerates the test PKI (valid for 100 years): two CAs and a server
# certificate from each for localhost, 127.0.0.1 and 10.0.2.2 (the host as
# QEMU's user network shows it). Test-only: the keys are public, so only
# test profiles may trust these CAs.
set -e
cd "$(dirname "$0")"
for ca in ca other-ca; do
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 36500 \
    -subj "/CN=kiln test $ca" -keyout $ca.key -out $ca.pem \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
done
srv() { # name ca days extra-openssl-args
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" -keyout $1.key -out $1.csr 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:10.0.2.2\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext.cnf
  openssl x509 -req -in $1.csr -CA $2.pem -CAkey $2.key -CAcreateserial -days $3 $4 -extfile ext.cnf -out $1.pem 2>/dev/null
  rm -f $1.csr ext.cnf
}
srv server ca 36500
srv other-server other-ca 36500
rm -f *.srl
# A server's own self-signed certificate (not a CA), which node.trust pins.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 36500 \
  -subj "/CN=kiln test pinned server" -keyout pinned.key -out pinned.pem \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1,IP:10.0.2.2 -addext basicConstraints=critical,CA:FALSE \
  -addext extendedKeyUsage=serverAuth 2>/dev/null

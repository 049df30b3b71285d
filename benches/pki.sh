# A test CA and a server certificate for the TLS benchmarks (benches/tls.sh, benches/profile.sh
# --tls), made with the openssl CLI; sourced. `make_test_pki DIR` writes DIR/ca.pem (the CA to
# trust: loadgen --tls-ca), DIR/cert.pem and DIR/key.pem (the server's: ECDSA P-256, for
# localhost and 127.0.0.1, valid 2 days) and fails with openssl's output if a step fails. DIR
# is a temporary folder of the caller, removed on exit: no key is ever committed.
make_test_pki() {
    local d=$1 ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
    command -v openssl > /dev/null || { echo "$(basename "$0"): needs the openssl CLI" >&2; return 1; }
    mkdir -p "$d"
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > "$d/s.ext"
    if ! (cd "$d" &&
        openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 2 -subj "/CN=bench CA" &&
        openssl req -new "${ec[@]}" -keyout key.pem -out s.csr -subj /CN=localhost &&
        openssl x509 -req -in s.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem \
            -days 2 -extfile s.ext) > "$d/openssl.log" 2>&1; then
        echo "$(basename "$0"): openssl failed:" >&2
        cat "$d/openssl.log" >&2
        return 1
    fi
}

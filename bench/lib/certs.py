#!/usr/bin/env python3
"""Self-signed test certificates for the benchmark.

    certs.py OUTDIR NAME...          one certificate per NAME: OUTDIR/NAME.crt, NAME.key,
                                     and NAME.pem (certificate + key, for HAProxy)
    certs.py --scale N OUTDIR        N certificates c0..c{N-1}, each for *.cK.scale.example.com

The key type comes from CERT_KEY: "ec" (ECDSA P-256, the default) or "rsa" (RSA 2048).
Uses the `cryptography` package when it is importable (fast: 1 000 certificates in about a
second), else the openssl command line (about 10 ms per EC certificate, much more for RSA).
Existing files are kept, so a cache directory is filled only once.
"""

import datetime
import os
import subprocess
import sys

KEY = os.environ.get("CERT_KEY", "ec")


def _with_cryptography(path, cn, sans):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    if KEY == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    crt = cert.public_bytes(serialization.Encoding.PEM)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return crt, pem_key


def _with_openssl(path, cn, sans):
    keyopt = (
        ["-newkey", "rsa:2048"]
        if KEY == "rsa"
        else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    )
    subprocess.run(
        ["openssl", "req", "-x509", *keyopt, "-nodes", "-days", "3650",
         "-keyout", path + ".key.tmp", "-out", path + ".crt.tmp",
         "-subj", "/CN=" + cn,
         "-addext", "subjectAltName=" + ",".join("DNS:" + s for s in sans)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    with open(path + ".crt.tmp", "rb") as f:
        crt = f.read()
    with open(path + ".key.tmp", "rb") as f:
        key = f.read()
    os.unlink(path + ".crt.tmp")
    os.unlink(path + ".key.tmp")
    return crt, key


try:
    import cryptography  # noqa: F401

    make = _with_cryptography
    HOW = "python cryptography"
except ImportError:
    make = _with_openssl
    HOW = "openssl req"


def write(outdir, stem, cn, sans):
    path = os.path.join(outdir, stem)
    if all(os.path.exists(path + ext) for ext in (".crt", ".key", ".pem")):
        return False
    crt, key = make(path, cn, sans)
    for ext, data in ((".crt", crt), (".key", key), (".pem", crt + key)):
        with open(path + ext + ".tmp", "wb") as f:
            f.write(data)
        os.chmod(path + ext + ".tmp", 0o600 if ext != ".crt" else 0o644)
        os.replace(path + ext + ".tmp", path + ext)
    return True


def main(argv):
    if len(argv) >= 3 and argv[0] == "--scale":
        n, outdir = int(argv[1]), argv[2]
        os.makedirs(outdir, exist_ok=True)
        made = 0
        for k in range(n):
            made += write(outdir, f"c{k}", f"c{k}.scale.example.com",
                          [f"*.c{k}.scale.example.com"])
        print(f"certs: {made} generated, {n - made} cached in {outdir} ({HOW}, {KEY})",
              file=sys.stderr)
        return 0
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    outdir = argv[0]
    os.makedirs(outdir, exist_ok=True)
    for name in argv[1:]:
        write(outdir, name, name, [name])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Consortium PKI: a CA, the server's TLS certificate, and hospital node keys.

TLS authenticates the server to the hospitals (Flower has no mTLS); each hospital proves who it
is by signing requests with its own EC key, whose public half the operator registers on the
SuperLink. The operator keeps ``ca.key`` offline, in its own folder: the server's files
(``server.pem``, ``server.key`` and a copy of ``ca.crt``) go to another folder, and
``fedscan server start`` refuses to run when a private key of the CA sits among them.
Hospitals receive only ``ca.crt``. A hospital generates its key pair itself and sends only the
``.pub`` file.

Private keys are created with mode 0600 from the first byte (``O_CREAT | O_EXCL``, never
written to a file others could read, whatever the umask) and never overwrite a file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedscan.shared.errors import FedscanError

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime browsers and most TLS stacks still accept


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    """Write ``path`` atomically, never over an existing file.

    A private key is written into a fresh temporary file created with mode 0600
    (``O_CREAT | O_EXCL | O_NOFOLLOW``), so no other user can open it at any moment, then
    linked to its name (``link`` fails if the name exists) and the temporary name removed.
    """
    path.parent.mkdir(mode=0o700 if private else 0o777, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o600 if private else 0o644)
    try:
        if private:
            os.fchmod(fd, 0o600)  # the umask can only have removed bits; make it exact
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FedscanError(f"refusing to overwrite {path} (move it away first)") from None
    finally:
        tmp.unlink()
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _refuse_overwrite(*paths: Path) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise FedscanError(f"refusing to overwrite {', '.join(existing)} (move it away first)")


def create_ca(out_dir: str | Path, name: str = "fedscan consortium CA") -> tuple[Path, Path]:
    """Create the consortium CA (``ca.crt``, ``ca.key``) in ``out_dir``.

    Returns:
        ``(ca.crt, ca.key)``.
    """
    out = Path(out_dir)
    crt, key_path = out / "ca.crt", out / "ca.key"
    _refuse_overwrite(crt, key_path)
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(crt, cert.public_bytes(serialization.Encoding.PEM))
    return crt, key_path


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def create_server_cert(ca_dir: str | Path, hosts: list[str], out_dir: str | Path,
                       days: int = SERVER_DAYS) -> tuple[Path, Path]:
    """Issue the SuperLink's TLS certificate, signed by the CA in ``ca_dir``.

    Args:
        ca_dir: folder with ``ca.crt`` and ``ca.key``.
        hosts: every DNS name and IP address hospitals use to reach the server (SANs); the
            first is also the common name.
        out_dir: the server's own folder: ``server.pem``, ``server.key`` and a copy of
            ``ca.crt`` go there; never the CA's folder (the server must not reach ``ca.key``).

    Returns:
        ``(server.pem, server.key)``.
    """
    if not hosts:
        raise FedscanError("the server certificate needs at least one --host (DNS name or IP)")
    ca_dir, out = Path(ca_dir), Path(out_dir)
    if out.resolve() == ca_dir.resolve():
        raise FedscanError(f"{out}: the server's files must not sit beside ca.key; choose "
                           "another output folder")
    pem, key_path, ca_copy = out / "server.pem", out / "server.key", out / "ca.crt"
    _refuse_overwrite(pem, key_path)
    try:
        ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    except FileNotFoundError as exc:
        raise FedscanError(f"CA not found: {exc.filename} (run `fedscan certs ca` first)") from None
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(pem, cert.public_bytes(serialization.Encoding.PEM))
    ca_bytes = (ca_dir / "ca.crt").read_bytes()
    if not ca_copy.exists():
        _write(ca_copy, ca_bytes)
    elif ca_copy.read_bytes() != ca_bytes:
        raise FedscanError(f"{ca_copy} is another CA's certificate (move it away first)")
    return pem, key_path


def private_keys_of(cert_path: str | Path, folders: list[Path]) -> list[Path]:
    """Private keys in ``folders`` (not recursive) that belong to the certificate.

    ``fedscan server start`` uses it to refuse a server that could read the CA's key, under
    any file name.
    """
    public = x509.load_pem_x509_certificate(Path(cert_path).read_bytes()).public_key()
    wanted = public.public_bytes(serialization.Encoding.DER,
                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    found = []
    for folder in folders:
        for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
            try:
                if not path.is_file() or path.stat().st_size > 65536:
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            if b"PRIVATE KEY" not in data:
                continue
            try:
                key = serialization.load_pem_private_key(data, None)
            except (ValueError, TypeError):
                continue
            if key.public_key().public_bytes(
                    serialization.Encoding.DER,
                    serialization.PublicFormat.SubjectPublicKeyInfo) == wanted:
                found.append(path)
    return found


def create_site_key(name: str, out_dir: str | Path) -> tuple[Path, Path]:
    """A hospital's node-authentication key pair: OpenSSH ECDSA P-384, as Flower expects.

    Equivalent to ``ssh-keygen -t ecdsa -b 384 -N "" -f OUT/NAME``. The private key stays at
    the hospital; the operator registers ``NAME.pub``.

    Returns:
        ``(private key, public key)``.
    """
    out = Path(out_dir)
    priv_path, pub_path = out / name, out / f"{name}.pub"
    _refuse_overwrite(priv_path, pub_path)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    _write(priv_path, priv, private=True)
    _write(pub_path, pub + f" fedscan-{name}\n".encode())
    return priv_path, pub_path


def certificate_summary(path: str | Path) -> dict[str, object]:
    """Subject, SANs and validity of a PEM certificate (for preflight and logs)."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in sans.get_values_for_type(x509.DNSName)]
        names += [str(v) for v in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    return {"subject": cert.subject.rfc4514_string(), "sans": names,
            "not_after": cert.not_valid_after_utc.isoformat()}

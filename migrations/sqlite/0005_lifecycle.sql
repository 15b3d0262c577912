-- keyward schema v5: the rest of a certificate's life (issue 7).
-- Renewal links a certificate to its successor; revocation reasons are the
-- RFC 5280 names ("key-compromise", "certificate-hold", ...); the key hash
-- finds every certificate of a public key (a revoked device's key cannot
-- register again).
ALTER TABLE certificates ADD COLUMN superseded_by TEXT;
ALTER TABLE certificates ADD COLUMN spki_sha256 TEXT;
CREATE INDEX certificates_spki ON certificates(spki_sha256);
-- The CRL reads the revoked certificates of one issuer.
CREATE INDEX certificates_issuer_status ON certificates(issuer_ca, status);

-- Signed CRLs, numbered per issuer without gaps (the number is the CRL
-- number extension). Older ones are pruned when a new one is published.
CREATE TABLE crls (
    issuer_ca   TEXT NOT NULL,
    number      INTEGER NOT NULL,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    entries     INTEGER NOT NULL,
    der         BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (issuer_ca, number)
);

-- keyward's own certificates for its services: the delegated OCSP signer of
-- each issuing CA and the TLS server certificate. The certificate row holds
-- the DER and status; the key row holds the HSM handle.
CREATE TABLE service_certificates (
    serial      TEXT PRIMARY KEY REFERENCES certificates(serial),
    purpose     TEXT NOT NULL,
    issuer_ca   TEXT NOT NULL,
    key_id      TEXT NOT NULL REFERENCES keys(id),
    not_after   INTEGER NOT NULL,
    retired_at  INTEGER,
    created_at  INTEGER NOT NULL
);
CREATE INDEX service_certificates_purpose ON service_certificates(purpose, issuer_ca);

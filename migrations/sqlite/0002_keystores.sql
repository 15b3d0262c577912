-- keyward schema v2: keys name the configured key store that holds them,
-- so that one daemon can use several (a YubiKey root, a PKCS#11 issuing CA).
ALTER TABLE keys ADD COLUMN keystore TEXT NOT NULL DEFAULT 'default';

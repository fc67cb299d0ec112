// `node keygen.mjs KID OUT.json`: one RSA signing key for the test
// provider, as the private JWK (for the provider) and PKCS#8 PEM (for a
// test that signs tokens of its own with it). Kept apart from provider.mjs
// so that generating a key loads nothing else.
import crypto from 'node:crypto';
import fs from 'node:fs';

const { privateKey, publicKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const key = {
  kid: process.argv[2],
  jwk: privateKey.export({ format: 'jwk' }),
  pem: privateKey.export({ type: 'pkcs8', format: 'pem' }),
  public_pem: publicKey.export({ type: 'spki', format: 'pem' }),
};
fs.writeFileSync(process.argv[3], JSON.stringify([key]));

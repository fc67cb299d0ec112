// A real OpenID Provider (oidc-provider) for the tests, on loopback.
//
//   node provider.mjs CONFIG.json
//
// CONFIG: { "port": N, "keys": "keys.json", "accounts": "accounts.json",
//           "clients": [ ...oidc-provider client metadata... ],
//           "resource": "https://gatehouse.test" }
// keys.json is a list of { "kid", "jwk" (private) }; accounts.json maps an
// account id to { "email", "groups" } and is read again on every login, so a
// test can change a person's groups between logins.
import crypto from 'node:crypto';
import fs from 'node:fs';
import Provider from 'oidc-provider';

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const keys = JSON.parse(fs.readFileSync(cfg.keys, 'utf8'));
const issuer = `http://127.0.0.1:${cfg.port}`;

const provider = new Provider(issuer, {
  clients: cfg.clients,
  jwks: { keys: keys.map((k) => ({ ...k.jwk, kid: k.kid, use: 'sig', alg: 'RS256' })) },
  findAccount: async (_ctx, id) => {
    const accounts = JSON.parse(fs.readFileSync(cfg.accounts, 'utf8'));
    const a = accounts[id];
    if (!a) return undefined;
    return {
      accountId: id,
      claims: async () => ({ sub: id, email: a.email, groups: a.groups }),
    };
  },
  claims: { openid: ['sub'], email: ['email'], groups: ['groups'] },
  // Groups and e-mail go into the ID token itself, as most IdPs do.
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => cfg.resource,
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, resource) => {
        if (resource !== cfg.resource) throw new Error(`unknown resource ${resource}`);
        return {
          scope: 'gatehouse',
          audience: cfg.resource,
          accessTokenTTL: 600,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
});
provider.proxy = false;
provider.listen(cfg.port, '127.0.0.1', () => {
  console.log(`oidc-provider listening on ${issuer}`);
});

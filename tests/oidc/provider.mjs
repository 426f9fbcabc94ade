// The OpenID provider tests/e2e signs in through: panva's certified oidc-provider with its
// own login and consent pages, one confidential client that must use PKCE, and the accounts
// given on the command line. Prints "oidc provider ready at <issuer>" once it listens.
//
//   node provider.mjs PORT CLIENT_ID CLIENT_SECRET REDIRECT_URI 'alice=beckon-ops,staff' ...
//
// Each account is NAME=GROUP,GROUP: the provider's built-in login page takes the name (any
// password, it is a test provider) and the ID token carries the groups in `groups`.

import { generateKeyPairSync } from "node:crypto";
import Provider from "oidc-provider";

const [port, clientId, clientSecret, redirectUri, ...accountArgs] = process.argv.slice(2);
if (!port || !clientId || !clientSecret || !redirectUri) {
  console.error("usage: node provider.mjs PORT CLIENT_ID CLIENT_SECRET REDIRECT_URI NAME=GROUP,... ...");
  process.exit(2);
}

const accounts = new Map(accountArgs.map((a) => {
  const [name, groups = ""] = a.split("=");
  return [name, groups.split(",").filter(Boolean)];
}));

// A fresh RSA signing key per run: the console reads it from jwks_uri.
const { privateKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: "jwk" }), kid: "test-rs256", use: "sig", alg: "RS256" };

const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    redirect_uris: [redirectUri],
    grant_types: ["authorization_code"],
    response_types: ["code"],
    token_endpoint_auth_method: "client_secret_basic",
  }],
  jwks: { keys: [signingKey] },
  cookies: { keys: ["beckon-e2e-cookie-key"] },
  pkce: { required: () => true },
  scopes: ["openid", "profile", "email", "groups"],
  claims: {
    openid: ["sub"],
    profile: ["preferred_username", "name"],
    email: ["email"],
    groups: ["groups"],
  },
  // The claims of the scopes go into the ID token (the console reads only the ID token).
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, id) {
    if (!accounts.has(id)) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, preferred_username: id, name: id, email: `${id}@example.test`, groups: accounts.get(id) };
      },
    };
  },
});
provider.proxy = false;

const server = provider.listen(Number(port), "127.0.0.1", () => {
  console.log(`oidc provider ready at ${issuer}`);
});
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => server.close(() => process.exit(0)));
}

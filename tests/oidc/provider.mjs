// A real OpenID Connect provider for the sign-in tests: panva's
// oidc-provider (OpenID Certified), on 127.0.0.1, with its development
// login and consent pages. Its people are read from a JSON file at every
// sign-in, so that a test can change someone's groups between two logins.
//
//   node provider.mjs <port> <redirect_uri> <people.json>
//
// people.json: {"<login>": {"email", "email_verified", "name",
// "preferred_username", "groups": [...]}}. Prints "ready" once it listens.

import fs from "node:fs";
import Provider from "oidc-provider";

const [port, redirectUri, peopleFile] = process.argv.slice(2);
const people = () => JSON.parse(fs.readFileSync(peopleFile, "utf8"));

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: [
    {
      client_id: "chat",
      client_secret: "chat-secret",
      redirect_uris: [redirectUri],
      grant_types: ["authorization_code"],
      response_types: ["code"],
      token_endpoint_auth_method: "client_secret_post",
    },
  ],
  pkce: { required: () => true },
  scopes: ["openid", "profile", "email", "groups"],
  claims: {
    openid: ["sub"],
    email: ["email", "email_verified"],
    profile: ["name", "preferred_username"],
    groups: ["groups"],
  },
  async findAccount(_ctx, id) {
    const person = people()[id];
    if (!person) return undefined;
    return { accountId: id, claims: async () => ({ sub: id, ...person }) };
  },
  features: { devInteractions: { enabled: true } },
  cookies: { keys: ["tests-only-cookie-key"] },
});
provider.proxy = false;
// The development pages refuse nothing; say so only once, not per request.
provider.on("server_error", (_ctx, error) => console.error("server_error", error));
provider.listen(Number(port), "127.0.0.1", () => console.log("ready"));

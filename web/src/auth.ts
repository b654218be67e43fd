/** Sign-in: OAuth 2.0 authorization code with PKCE (RFC 7636, S256), the flow Cognito's hosted
 * UI offers public clients (no client secret in a browser). The same code runs against the
 * local issuer of `make up`, which serves the same two endpoints.
 *
 * Tokens live in sessionStorage: they survive a reload of this tab (the upload flow polls for
 * minutes) but not the tab, and no other origin can read them; the CSP allows no third-party
 * script. Nothing is refreshed silently: when the access token expires the user signs in again. */
import type { AppConfig } from "./config";

const KEY = "avatarflow.session";
const PENDING = "avatarflow.pkce";

export interface Session {
  accessToken: string;
  idToken: string | null;
  expiresAt: number; // epoch ms
  userId: string; // the token's `sub`: the API's path user id
  email: string | null;
}

function base64url(bytes: Uint8Array): string {
  let text = "";
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomString(bytes = 32): string {
  return base64url(crypto.getRandomValues(new Uint8Array(bytes)));
}

async function challengeOf(verifier: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  return base64url(new Uint8Array(digest));
}

/** A JWT's claims, unverified: only to show who is signed in and to build paths; the API's
 * JWT authorizer is what verifies the token. */
export function claimsOf(token: string): Record<string, unknown> {
  const part = token.split(".")[1] ?? "";
  const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
  return JSON.parse(json) as Record<string, unknown>;
}

export function redirectUri(): string {
  return `${location.origin}/`;
}

export async function signIn(config: AppConfig): Promise<void> {
  const verifier = randomString(48);
  const state = randomString(16);
  sessionStorage.setItem(PENDING, JSON.stringify({ verifier, state }));
  const url = new URL(config.authorizeUrl);
  url.search = new URLSearchParams({
    response_type: "code",
    client_id: config.clientId,
    redirect_uri: redirectUri(),
    scope: config.scopes,
    state,
    code_challenge: await challengeOf(verifier),
    code_challenge_method: "S256",
  }).toString();
  location.assign(url.toString());
}

/** Finishes a sign-in when the page was opened by the authorization server's redirect
 * (?code=&state=): checks the state, swaps the code for tokens, and drops them from the URL. */
export async function completeSignIn(config: AppConfig): Promise<Session | null> {
  const params = new URLSearchParams(location.search);
  const code = params.get("code");
  const error = params.get("error");
  if (!code && !error) return null;
  history.replaceState(null, "", location.pathname);
  const pending = JSON.parse(sessionStorage.getItem(PENDING) ?? "null") as { verifier: string; state: string } | null;
  sessionStorage.removeItem(PENDING);
  if (error) throw new Error(`sign-in refused: ${error}`);
  if (!pending || params.get("state") !== pending.state) throw new Error("sign-in answer does not match this tab");
  const response = await fetch(config.tokenUrl, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({
      grant_type: "authorization_code",
      client_id: config.clientId,
      code: code ?? "",
      redirect_uri: redirectUri(),
      code_verifier: pending.verifier,
    }),
  });
  if (!response.ok) throw new Error(`sign-in failed: HTTP ${response.status}`);
  const tokens = (await response.json()) as { access_token: string; id_token?: string; expires_in: number };
  const claims = claimsOf(tokens.access_token);
  const idClaims = tokens.id_token ? claimsOf(tokens.id_token) : {};
  const session: Session = {
    accessToken: tokens.access_token,
    idToken: tokens.id_token ?? null,
    expiresAt: Date.now() + tokens.expires_in * 1000,
    userId: String(claims.sub),
    email: typeof idClaims.email === "string" ? idClaims.email : null,
  };
  sessionStorage.setItem(KEY, JSON.stringify(session));
  return session;
}

export function currentSession(): Session | null {
  const session = JSON.parse(sessionStorage.getItem(KEY) ?? "null") as Session | null;
  if (!session || session.expiresAt - 30_000 < Date.now()) return null;
  return session;
}

export function signOut(config: AppConfig): void {
  sessionStorage.removeItem(KEY);
  if (config.logoutUrl) {
    const url = new URL(config.logoutUrl);
    url.search = new URLSearchParams({ client_id: config.clientId, logout_uri: redirectUri() }).toString();
    location.assign(url.toString());
  } else {
    location.assign(redirectUri());
  }
}

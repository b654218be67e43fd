/** The deployment's settings, read once from /config.json (written by the stack at deploy time,
 * served by `make up` locally): nothing about an environment is built into the bundle. */
export interface AppConfig {
  /** Base of the API, "/api" when CloudFront (or the local server) routes it on the app's origin. */
  apiBase: string;
  clientId: string;
  authorizeUrl: string;
  tokenUrl: string;
  /** Where signing out goes (Cognito's /logout), or null to only forget the tokens. */
  logoutUrl: string | null;
  scopes: string;
  maxUploadBytes: number;
  minPhotos: number;
  maxPhotos: number;
  /** How often a running step asks the API again. */
  pollMs: number;
}

export async function loadConfig(): Promise<AppConfig> {
  const response = await fetch("/config.json", { cache: "no-store" });
  if (!response.ok) throw new Error(`config.json: HTTP ${response.status}`);
  const raw = (await response.json()) as Partial<AppConfig>;
  for (const key of ["apiBase", "clientId", "authorizeUrl", "tokenUrl"] as const) {
    if (typeof raw[key] !== "string" || !raw[key]) throw new Error(`config.json lacks ${key}`);
  }
  return {
    logoutUrl: null,
    scopes: "openid email",
    maxUploadBytes: 20 * 1024 * 1024,
    minPhotos: 10,
    maxPhotos: 15,
    pollMs: 3000,
    ...raw,
  } as AppConfig;
}

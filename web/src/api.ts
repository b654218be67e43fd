/** The avatarflow API as the app uses it (docs/openapi.json; the batches and packs routes are
 * the contracts of issues 18 and 17). Every path is under /users/{sub}. */
import type { Session } from "./auth";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    /** true for API Gateway's own 404 (a route this deployment does not have yet). */
    readonly routeMissing = false,
  ) {
    super(message);
  }
}

export interface UploadForm {
  name: string;
  key: string;
  url: string;
  fields: Record<string, string>;
}
export interface UploadBatch {
  batch_id: string;
  max_bytes: number;
  uploads: UploadForm[];
}
export interface PhotoVerdict {
  name: string;
  verdict: "accepted" | "rejected" | "pending";
  reason?: string;
}
export interface BatchView {
  batch_id: string;
  stage: string;
  queue: { position: number; estimated_wait_seconds: number } | null;
  training: { step: number; total_steps: number } | null;
  photos: PhotoVerdict[];
  model_version?: string;
  updated_at?: string;
}
export interface ModelView {
  version: string;
  status: string;
  batch_id: string;
  identity_score: number | null;
  error?: string | null;
}
export interface ImageView {
  url: string;
  seed?: number | null;
  identity_similarity?: number | null;
}
export interface GenerationView {
  generation_id: string;
  status: string;
  images?: ImageView[];
  /** Images the output moderation held back (never delivered). */
  withheld?: number;
  error?: string;
}
export interface PackStyle {
  name: string;
  status: string;
  images: ImageView[];
  error?: string;
}
export interface PackView {
  pack_id: string;
  status: string;
  styles_done: number;
  styles_total: number;
  styles: PackStyle[];
  contact_sheet_url?: string;
  created_at?: string;
}
export interface DeletionView {
  status: "PENDING" | "DONE";
  in_flight?: Record<string, number>;
  completed_at?: string;
}

export class Api {
  constructor(
    private readonly base: string,
    private readonly session: Session,
    private readonly onUnauthorized: () => void,
  ) {}

  private path(rest = ""): string {
    return `${this.base}/users/${encodeURIComponent(this.session.userId)}${rest}`;
  }

  private async call<T>(method: string, rest: string, body?: unknown): Promise<T> {
    const response = await fetch(this.path(rest), {
      method,
      headers: {
        Authorization: `Bearer ${this.session.accessToken}`,
        ...(body === undefined ? {} : { "Content-Type": "application/json" }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) {
      this.onUnauthorized();
      throw new ApiError(401, "your session has ended: sign in again");
    }
    if (response.status === 204) return undefined as T;
    const data = (await response.json().catch(() => ({}))) as Record<string, unknown>;
    if (!response.ok) {
      const retry = response.headers.get("Retry-After");
      const errors = Array.isArray(data.errors) ? data.errors as { reason?: string }[] : [];
      const detail = errors.map((e) => e.reason).filter(Boolean).join("; ");
      const message = [String(data.message ?? `HTTP ${response.status}`), detail].filter(Boolean).join(": ");
      // API Gateway answers an unknown route with exactly {"message": "Not Found"}; the
      // function's own 404s carry statusCode too.
      const routeMissing = response.status === 404 && data.message === "Not Found" && !("statusCode" in data);
      throw new ApiError(response.status, retry ? `${message} (try again in ${retry} s)` : message, routeMissing);
    }
    return data as T;
  }

  createUploads(files: { name: string; content_type: string }[]): Promise<UploadBatch> {
    return this.call("POST", "/uploads", { files, include_request_json: true });
  }
  batch(batchId: string): Promise<BatchView> {
    return this.call("GET", `/batches/${encodeURIComponent(batchId)}`);
  }
  batches(): Promise<{ batches: BatchView[] }> {
    return this.call("GET", "/batches");
  }
  models(): Promise<{ latest_ready: string | null; models: ModelView[] }> {
    return this.call("GET", "/models");
  }
  generate(prompt: string, numImages: number): Promise<{ generation_id: string }> {
    return this.call("POST", "/generations", { prompt, num_images: numImages });
  }
  generation(id: string): Promise<GenerationView> {
    return this.call("GET", `/generations/${encodeURIComponent(id)}`);
  }
  packs(): Promise<{ packs: { pack_id: string; status: string; created_at?: string }[] }> {
    return this.call("GET", "/packs");
  }
  createPack(): Promise<{ pack_id: string }> {
    return this.call("POST", "/packs", {});
  }
  pack(packId: string): Promise<PackView> {
    return this.call("GET", `/packs/${encodeURIComponent(packId)}`);
  }
  deleteMe(): Promise<DeletionView | undefined> {
    return this.call("DELETE", "");
  }
  deletion(): Promise<DeletionView> {
    return this.call("GET", "/deletion");
  }
}

/** One presigned POST form: its fields first, the file last (S3 ignores fields after it). */
export async function postForm(form: UploadForm, body: Blob): Promise<void> {
  const data = new FormData();
  for (const [name, value] of Object.entries(form.fields)) data.append(name, value);
  data.append("file", body, form.name);
  const response = await fetch(form.url, { method: "POST", body: data });
  if (!response.ok) throw new ApiError(response.status, `storage refused ${form.name}: HTTP ${response.status}`);
}

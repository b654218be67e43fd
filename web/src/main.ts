/** The app: sign in, then one page of numbered steps (photos, training, pack, generate) and
 * "delete my data". Each step polls its route while something runs and shows plain words. */
import "./style.css";
import { Api, ApiError, postForm, type BatchView, type ImageView, type PackView } from "./api";
import { completeSignIn, currentSession, signIn, signOut, type Session } from "./auth";
import { checkPhotos, countProblem } from "./checks";
import { loadConfig, type AppConfig } from "./config";
import { h, replace, sleep } from "./dom";

const BATCH_KEY = "avatarflow.batch";
const main = document.getElementById("main") as HTMLElement;
const who = document.getElementById("who") as HTMLElement;

function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function section(id: string, title: string, ...children: (Node | string)[]): HTMLElement {
  return h("section", { id, "aria-labelledby": `${id}-title`, class: "card" }, h("h2", { id: `${id}-title` }, title), ...children);
}

function status(id: string): HTMLElement {
  return h("p", { id, class: "status", role: "status", "aria-live": "polite" });
}

function percent(value: number | null | undefined): string {
  return typeof value === "number" ? `${Math.round(value * 100)}%` : "not measured";
}

async function download(url: string, name: string, note: HTMLElement): Promise<void> {
  try {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const link = h("a", { href: URL.createObjectURL(await response.blob()), download: name });
    document.body.append(link);
    link.click();
    link.remove();
    note.textContent = `Downloaded ${name}.`;
  } catch (error) {
    note.textContent = `Download failed (${message(error)}); the link may have expired: reload the page.`;
  }
}

function gallery(images: ImageView[], label: string, note: HTMLElement): HTMLElement {
  return h(
    "ul",
    { class: "gallery", "aria-label": label },
    ...images.map((image, i) => {
      const name = `${label.toLowerCase().replace(/[^a-z0-9]+/g, "-")}-${i + 1}.png`;
      return h(
        "li",
        {},
        h(
          "figure",
          {},
          h("img", { src: image.url, alt: `${label}, image ${i + 1}`, width: 256, height: 256, loading: "lazy" }),
          h(
            "figcaption",
            {},
            image.identity_similarity !== undefined ? `Likeness to you: ${percent(image.identity_similarity)}` : "",
          ),
        ),
        h("button", { type: "button", class: "secondary", onclick: () => void download(image.url, name, note) }, `Download ${label} image ${i + 1}`),
      );
    }),
  );
}

// --------------------------------------------------------------------------- photos

function photosStep(config: AppConfig, api: Api, email: string | null, onBatch: (batchId: string) => void): HTMLElement {
  const input = h("input", {
    id: "photo-input",
    type: "file",
    multiple: true,
    accept: "image/jpeg,image/png,image/webp,image/heic,.heic",
    "aria-describedby": "photo-help",
  });
  const list = h("ul", { id: "photo-list", class: "files", "aria-label": "Chosen photos" });
  const problem = h("p", { id: "photo-problem", class: "problem", role: "alert" });
  const state = status("upload-status");
  const submit = h("button", { type: "submit", id: "upload-button", disabled: true }, "Upload and start training");
  let chosen: ReturnType<typeof checkPhotos> = [];

  input.addEventListener("change", () => {
    chosen = checkPhotos(Array.from(input.files ?? []), config.maxUploadBytes);
    replace(
      list,
      ...chosen.map((c) =>
        h("li", { class: c.problem ? "bad" : "ok" }, `${c.file.name}: `, c.problem ? `refused, ${c.problem}` : "ready to upload"),
      ),
    );
    const bad = chosen.filter((c) => c.problem).length;
    const text =
      countProblem(chosen.length, config.minPhotos, config.maxPhotos) ??
      (bad ? `${bad} photo${bad > 1 ? "s" : ""} cannot be used: choose again without ${bad > 1 ? "them" : "it"}.` : "");
    problem.textContent = text;
    submit.disabled = Boolean(text);
  });

  const form = h(
    "form",
    {
      onsubmit: async (event: Event) => {
        event.preventDefault();
        submit.disabled = true;
        try {
          state.textContent = "Asking for upload forms…";
          const batch = await api.createUploads(chosen.map((c) => ({ name: c.name, content_type: c.contentType ?? "" })));
          let done = 0;
          for (const form of batch.uploads) {
            const photo = chosen.find((c) => c.name === form.name);
            const body = photo
              ? photo.file
              : new Blob([JSON.stringify(email ? { email } : {})], { type: "application/json" });
            await postForm(form, body);
            if (photo) state.textContent = `Uploaded ${++done} of ${chosen.length} photos…`;
          }
          state.textContent = `All ${chosen.length} photos uploaded. Checking them now: see step 2.`;
          onBatch(batch.batch_id);
        } catch (error) {
          state.textContent = `Upload failed: ${message(error)}`;
          submit.disabled = false;
        }
      },
    },
    h("label", { for: "photo-input" }, `Photos of your face (${config.minPhotos} to ${config.maxPhotos})`),
    h(
      "p",
      { id: "photo-help", class: "help" },
      `JPEG, PNG, WebP or HEIC, up to ${Math.round(config.maxUploadBytes / 1024 / 1024)} MB each. One person only, ` +
        "face clearly visible, different days and angles. Photos that do not qualify are set aside.",
    ),
    input,
    list,
    problem,
    submit,
    state,
  );
  return section("photos", "1. Upload your photos", form);
}

// --------------------------------------------------------------------------- training

const STAGES: Record<string, string> = {
  settling: "Waiting until all your photos have arrived",
  intake: "Checking each photo",
  queued: "Waiting for a training machine",
  training: "Training your model",
  registering: "Saving your model",
  ready: "Your model is ready",
  rejected: "Not enough usable photos: upload a new set",
  failed: "Training failed: upload a new set to try again",
};

function trainingStep(config: AppConfig, api: Api, onReady: () => void): { el: HTMLElement; watch: (batchId: string) => void } {
  const state = status("training-status");
  const bar = h("progress", { id: "training-progress", max: 1, value: 0, "aria-labelledby": "training-status" });
  bar.hidden = true;
  const verdicts = h("div", { id: "verdicts" });
  const el = section("training", "2. Training", h("p", { class: "help" }, "Nothing to do here: this follows your latest upload."), state, bar, verdicts);
  state.textContent = "No upload yet.";
  let watching = "";

  function showBatch(view: BatchView): void {
    const words = STAGES[view.stage] ?? view.stage;
    let detail = "";
    if (view.queue) detail = ` (position ${view.queue.position} in the queue, about ${Math.ceil(view.queue.estimated_wait_seconds / 60)} min)`;
    if (view.training) {
      detail = `: step ${view.training.step} of ${view.training.total_steps}`;
      bar.hidden = false;
      bar.max = view.training.total_steps;
      bar.value = view.training.step;
    } else if (view.stage === "ready") {
      bar.hidden = false;
      bar.value = bar.max;
    }
    state.textContent = `${words}${detail}.`;
    if (!view.photos.length) return;
    replace(
      verdicts,
      h(
        "table",
        {},
        h("caption", {}, "Each photo's check"),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Photo"), h("th", { scope: "col" }, "Verdict"), h("th", { scope: "col" }, "Why"))),
        h(
          "tbody",
          {},
          ...view.photos.map((p) =>
            h("tr", { class: p.verdict }, h("td", {}, p.name), h("td", {}, p.verdict), h("td", {}, p.reason ?? "")),
          ),
        ),
      ),
    );
  }

  /** Without the batches route (not deployed yet): the model registry says less, but says
   * when training runs and when it is done. */
  async function fromModels(batchId: string): Promise<boolean> {
    const models = await api.models();
    const model = models.models.find((m) => m.batch_id === batchId);
    if (!model) {
      state.textContent = "Photos uploaded; checking them and waiting for training (per-photo verdicts are not available on this server).";
      return false;
    }
    const stage = model.status === "READY" ? "ready" : model.status === "FAILED" ? "failed" : "training";
    showBatch({ batch_id: batchId, stage, queue: null, training: null, photos: [] });
    return stage !== "training";
  }

  async function watch(batchId: string): Promise<void> {
    watching = batchId;
    sessionStorage.setItem(BATCH_KEY, batchId);
    let useModels = false;
    while (watching === batchId) {
      try {
        let finished: boolean;
        if (!useModels) {
          try {
            const view = await api.batch(batchId);
            showBatch(view);
            finished = ["ready", "rejected", "failed"].includes(view.stage);
            if (view.stage === "ready") onReady();
          } catch (error) {
            if (!(error instanceof ApiError && error.routeMissing)) throw error;
            useModels = true;
            continue;
          }
        } else {
          finished = await fromModels(batchId);
          if (finished && state.textContent?.startsWith(STAGES.ready)) onReady();
        }
        if (finished) return;
      } catch (error) {
        if (error instanceof ApiError && error.status === 404) {
          state.textContent = "Photos uploaded; waiting for the first check.";
        } else {
          state.textContent = `Could not read the training status: ${message(error)}`;
          if (error instanceof ApiError && error.status === 401) return;
        }
      }
      await sleep(config.pollMs);
    }
  }

  return { el, watch: (batchId) => void watch(batchId) };
}

// --------------------------------------------------------------------------- pack

function packStep(config: AppConfig, api: Api): { el: HTMLElement; ready: () => void } {
  const state = status("pack-status");
  const note = status("pack-download-status");
  const make = h("button", { type: "button", id: "pack-button", disabled: true }, "Make my avatar pack");
  const body = h("div", { id: "pack-gallery" });
  const el = section("pack", "3. Your avatar pack", h("p", { class: "help" }, "A set of styles made from your model, with how closely each image resembles you."), make, state, body, note);
  state.textContent = "Available once your model is ready.";
  let available = true;

  function show(pack: PackView): void {
    state.textContent =
      pack.status === "COMPLETED" || pack.status === "PARTIAL"
        ? `Your pack: ${pack.styles_done} of ${pack.styles_total} styles done.`
        : pack.status === "FAILED"
          ? "The pack could not be made."
          : `Making your pack: ${pack.styles_done} of ${pack.styles_total} styles done…`;
    replace(
      body,
      ...pack.styles.map((style) =>
        h(
          "div",
          { class: "style" },
          h("h3", {}, style.name),
          style.error ? h("p", {}, style.error) : gallery(style.images, style.name, note),
        ),
      ),
    );
  }

  async function follow(packId: string): Promise<void> {
    for (;;) {
      const pack = await api.pack(packId);
      show(pack);
      if (["COMPLETED", "PARTIAL", "FAILED"].includes(pack.status)) {
        make.disabled = false;
        return;
      }
      await sleep(config.pollMs);
    }
  }

  async function latest(): Promise<void> {
    try {
      const { packs } = await api.packs();
      make.disabled = false;
      const newest = [...packs].sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)))[0];
      if (newest) await follow(newest.pack_id);
      else state.textContent = "No pack yet.";
    } catch (error) {
      if (error instanceof ApiError && error.routeMissing) {
        available = false;
        make.disabled = true;
        state.textContent = "Avatar packs are not available on this server yet.";
      } else state.textContent = `Could not read your packs: ${message(error)}`;
    }
  }

  make.addEventListener("click", async () => {
    make.disabled = true;
    state.textContent = "Starting your pack…";
    try {
      const { pack_id } = await api.createPack();
      await follow(pack_id);
    } catch (error) {
      state.textContent = `Could not make a pack: ${message(error)}`;
      make.disabled = !available;
    }
  });
  return { el, ready: () => void latest() };
}

// --------------------------------------------------------------------------- generate

function generateStep(config: AppConfig, api: Api): { el: HTMLElement; ready: () => void } {
  const prompt = h("textarea", { id: "prompt", rows: 3, maxlength: 500, required: true, "aria-describedby": "prompt-help" });
  prompt.value = "portrait of sks person as an astronaut, studio light";
  const count = h("select", { id: "count" }, ...[1, 2, 3, 4].map((n) => h("option", { value: n, selected: n === 2 }, String(n))));
  const submit = h("button", { type: "submit", id: "generate-button", disabled: true }, "Generate");
  const state = status("generate-status");
  const note = status("generate-download-status");
  const results = h("div", { id: "generate-results" });
  state.textContent = "Available once your model is ready.";
  const form = h(
    "form",
    {
      onsubmit: async (event: Event) => {
        event.preventDefault();
        submit.disabled = true;
        try {
          state.textContent = "Queued…";
          const { generation_id } = await api.generate(prompt.value.trim(), Number(count.value));
          for (;;) {
            const view = await api.generation(generation_id);
            if (view.status === "COMPLETED") {
              const withheld = view.withheld ? ` ${view.withheld} more held back by the safety check.` : "";
              state.textContent = `Done: ${view.images?.length ?? 0} images.${withheld}`;
              replace(results, gallery(view.images ?? [], "Generated", note));
              break;
            }
            if (view.status === "FAILED") {
              state.textContent = `Generation failed: ${view.error ?? "unknown error"}`;
              break;
            }
            state.textContent = "Drawing your images…";
            await sleep(config.pollMs);
          }
        } catch (error) {
          state.textContent = `Could not generate: ${message(error)}`;
        }
        submit.disabled = false;
      },
    },
    h("label", { for: "prompt" }, "Describe the picture"),
    h("p", { id: "prompt-help", class: "help" }, "\"sks person\" stands for you. Some words are not allowed."),
    prompt,
    h("label", { for: "count" }, "Number of images"),
    count,
    submit,
  );
  const el = section("generate", "4. Generate", form, state, results, note);
  return { el, ready: () => { submit.disabled = false; state.textContent = "Your model is ready."; } };
}

// --------------------------------------------------------------------------- delete

function deleteStep(config: AppConfig, api: Api, done: () => void): HTMLElement {
  const state = status("delete-status");
  const confirmText = h("input", { id: "delete-confirm", type: "text", autocomplete: "off", "aria-describedby": "delete-help" });
  const confirm = h("button", { type: "submit", class: "danger", id: "delete-confirm-button", disabled: true }, "Delete everything");
  const cancel = h("button", { type: "button", class: "secondary", onclick: () => dialog.close() }, "Cancel");
  confirmText.addEventListener("input", () => { confirm.disabled = confirmText.value.trim() !== "DELETE"; });
  const dialog = h(
    "dialog",
    { id: "delete-dialog", "aria-labelledby": "delete-dialog-title" },
    h(
      "form",
      {
        onsubmit: async (event: Event) => {
          event.preventDefault();
          dialog.close();
          open.disabled = true;
          state.textContent = "Deleting your data…";
          try {
            await api.deleteMe();
            for (;;) {
              const view = await api.deletion();
              if (view.status === "DONE") break;
              const waiting = Object.values(view.in_flight ?? {}).reduce((a, b) => a + b, 0);
              state.textContent = waiting ? `Deleting: waiting for ${waiting} running job(s) to stop…` : "Deleting your data…";
              await sleep(config.pollMs);
            }
            state.textContent = "All your photos, models and images are deleted.";
            done();
          } catch (error) {
            state.textContent = `Deletion could not start: ${message(error)}`;
            open.disabled = false;
          }
        },
      },
      h("h2", { id: "delete-dialog-title" }, "Delete all your data?"),
      h("p", { id: "delete-help" }, "This deletes your photos, your trained model, your packs and every image, and cannot be undone. Type DELETE to confirm."),
      h("label", { for: "delete-confirm" }, "Confirmation"),
      confirmText,
      h("div", { class: "actions" }, cancel, confirm),
    ),
  );
  const open = h("button", { type: "button", class: "danger", id: "delete-button", onclick: () => { confirmText.value = ""; confirm.disabled = true; dialog.showModal(); confirmText.focus(); } }, "Delete my data…");
  return section("delete", "Delete my data", h("p", {}, "Removes everything this service keeps about you."), open, state, dialog);
}

// --------------------------------------------------------------------------- pages

function signedOut(config: AppConfig, problem = ""): void {
  document.title = "Sign in · avatarflow";
  replace(who);
  const button = h("button", { type: "button", id: "sign-in" }, "Sign in");
  button.addEventListener("click", () => void signIn(config));
  replace(
    main,
    h("h1", {}, "Your personal avatars"),
    h("p", {}, "Upload 10 to 15 photos of yourself, and a model trained for you alone draws you in any style you describe."),
    problem ? h("p", { class: "problem", role: "alert" }, problem) : null,
    button,
  );
}

function signedIn(config: AppConfig, session: Session): void {
  document.title = "Your avatars · avatarflow";
  const api = new Api(config.apiBase, session, () => signedOut(config, "Your session has ended: sign in again."));
  const out = h("button", { type: "button", class: "secondary", id: "sign-out", onclick: () => signOut(config) }, "Sign out");
  replace(who, h("span", {}, `Signed in as ${session.email ?? session.userId}`), " ", out);
  const pack = packStep(config, api);
  const generate = generateStep(config, api);
  const ready = () => { pack.ready(); generate.ready(); };
  const training = trainingStep(config, api, ready);
  const photos = photosStep(config, api, session.email, training.watch);
  const farewell = () => { sessionStorage.removeItem(BATCH_KEY); for (const s of [photos, training.el, pack.el, generate.el]) s.remove(); };
  replace(main, h("h1", {}, "Your avatars"), photos, training.el, pack.el, generate.el, deleteStep(config, api, farewell));
  main.focus();
  const batch = sessionStorage.getItem(BATCH_KEY);
  if (batch) training.watch(batch);
  api.models().then((m) => { if (m.latest_ready) ready(); }).catch(() => undefined);
}

async function start(): Promise<void> {
  let config: AppConfig;
  try {
    config = await loadConfig();
  } catch (error) {
    replace(main, h("h1", {}, "avatarflow"), h("p", { class: "problem", role: "alert" }, `The app is not configured: ${message(error)}`));
    return;
  }
  try {
    const session = (await completeSignIn(config)) ?? currentSession();
    if (session) signedIn(config, session);
    else signedOut(config);
  } catch (error) {
    signedOut(config, message(error));
  }
}

void start();

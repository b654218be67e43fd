/** The browser's checks on chosen photos, before anything is sent (the API and the workflow
 * check again: these only save the user a wasted upload). */
export const PHOTO_TYPES: Record<string, string> = {
  "image/jpeg": "jpg",
  "image/png": "png",
  "image/webp": "webp",
  "image/heic": "heic",
};
const EXTENSION_TYPES: Record<string, string> = { jpg: "image/jpeg", jpeg: "image/jpeg", png: "image/png", webp: "image/webp", heic: "image/heic", heif: "image/heic" };

export interface Checked {
  file: File;
  name: string; // the upload's file name: [A-Za-z0-9][A-Za-z0-9._-]{0,99}, unique
  contentType: string | null;
  problem: string | null;
}

function safeName(original: string, index: number, extension: string): string {
  const stem = original.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[^A-Za-z0-9]+/, "");
  return `${String(index + 1).padStart(2, "0")}-${stem || "photo"}`.slice(0, 90) + `.${extension}`;
}

export function checkPhotos(files: File[], maxBytes: number): Checked[] {
  return files.map((file, index) => {
    const extension = (file.name.split(".").pop() ?? "").toLowerCase();
    // Some browsers give HEIC files no type: the extension decides then.
    const contentType = file.type in PHOTO_TYPES ? file.type : file.type ? null : (EXTENSION_TYPES[extension] ?? null);
    let problem: string | null = null;
    if (!contentType) problem = "not a JPEG, PNG, WebP or HEIC photo";
    else if (file.size === 0) problem = "the file is empty";
    else if (file.size > maxBytes) problem = `larger than ${Math.round(maxBytes / 1024 / 1024)} MB`;
    const name = safeName(file.name, index, contentType ? PHOTO_TYPES[contentType] : "bin");
    return { file, name, contentType, problem };
  });
}

export function countProblem(count: number, min: number, max: number): string | null {
  if (count < min) return `Choose at least ${min} photos (you chose ${count}).`;
  if (count > max) return `Choose at most ${max} photos (you chose ${count}).`;
  return null;
}

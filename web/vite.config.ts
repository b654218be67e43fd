import { defineConfig } from "vite";

// One entry (index.html), hashed assets, no inline script or style (the CSP allows 'self' only),
// no source maps shipped. config.json is not part of the build: the stack writes it at deploy time
// and `make up` serves one for the local stack.
export default defineConfig({
  base: "/",
  build: {
    outDir: "dist",
    emptyOutDir: true,
    sourcemap: false,
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
  },
});

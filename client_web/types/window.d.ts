// Types for tsc only (tsconfig.json): never served, never bundled.

interface Window {
  /** The watch and broadcast pages' handles for tests and debugging. */
  scrubin?: object;
  /** The recording player's handle for tests. */
  scrubinPlayer?: object;
  /** The recordings library's handle for tests. */
  scrubinLibrary?: {
    recordings: () => unknown[]; exports: () => unknown[]; shared: () => unknown[];
    reload: () => unknown; lastDeleted: unknown;
  };
}

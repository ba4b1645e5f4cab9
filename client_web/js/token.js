// @ts-check
/**
 * The participant's token travels in the URL fragment (`#token=…`) so it never
 * reaches server logs or Referer headers. Once read it is removed from the
 * address bar, so a trainee copying the URL to a colleague does not hand over
 * their access by accident. It is kept in sessionStorage (this tab only) so a
 * reload still works.
 */

const STORAGE_KEY = 'scrubin.token';

/**
 * @param {string} hash  e.g. `#token=abc&x=1`
 * @returns {string} the token, or ''
 */
export function tokenFromHash(hash) {
  const params = new URLSearchParams(hash.replace(/^#/, ''));
  return (params.get('token') || '').trim();
}

/**
 * Read the token for this page and scrub it from the visible URL.
 * @param {{location: Location, history: History, sessionStorage?: Storage}} [win]
 * @returns {string} the token, or '' if the page was opened without one
 */
export function takeToken(win = window) {
  const fromHash = tokenFromHash(win.location.hash);
  const storageKey = `${STORAGE_KEY}:${win.location.pathname}`;
  if (fromHash) {
    try {
      win.sessionStorage?.setItem(storageKey, fromHash);
    } catch {
      /* storage disabled: the token just won't survive a reload */
    }
    const params = new URLSearchParams(win.location.hash.replace(/^#/, ''));
    params.delete('token');
    const rest = params.toString();
    const clean = win.location.pathname + win.location.search + (rest ? `#${rest}` : '');
    win.history.replaceState(win.history.state, '', clean);
    return fromHash;
  }
  try {
    return win.sessionStorage?.getItem(storageKey) || '';
  } catch {
    return '';
  }
}

/** Forget this tab's token (after the session ended or it was refused). */
export function forgetToken(/** @type {Window} */ win = window) {
  try {
    win.sessionStorage?.removeItem(`${STORAGE_KEY}:${win.location.pathname}`);
  } catch {
    /* nothing stored */
  }
}

/**
 * The claims of a token, for display only (the server verifies it): `sid` (the
 * Session), `role`, `name`… An unreadable token gives `{}`.
 * @param {string} jwt
 * @returns {Record<string, unknown>}
 */
export function tokenClaims(jwt) {
  try {
    const part = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const bytes = Uint8Array.from(atob(part + '='.repeat((4 - (part.length % 4)) % 4)),
      (c) => c.charCodeAt(0));
    const value = JSON.parse(new TextDecoder().decode(bytes));
    return value && typeof value === 'object' ? value : {};
  } catch {
    return {};
  }
}

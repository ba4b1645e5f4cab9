// @ts-check
/**
 * Shared by the library and player pages: the reviewer's token, JSON calls
 * to the review API, and how times and scopes read.
 */

import { ScrubinError } from './protocol.js';
import { takeToken } from './token.js';

/**
 * The page's token (URL fragment, then this tab's storage) and other fragment values.
 * @returns {{token: string} & Record<string, string | undefined>}
 */
export function pageParams() {
  const hash = new URLSearchParams(location.hash.replace(/^#/, ''));
  const extra = Object.fromEntries([...hash.entries()].filter(([k]) => k !== 'token'));
  return { token: takeToken(), ...extra };
}

/**
 * The Session a token is for (its `sid` claim; read, not verified: the server verifies).
 * @param {string} token
 */
export function tokenSession(token) {
  try {
    const payload = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(payload + '='.repeat((4 - (payload.length % 4)) % 4)));
    return { session: String(claims.sid || ''), role: String(claims.role || '') };
  } catch {
    return { session: '', role: '' };
  }
}

/** Refusals after which this page cannot go on with its token: the state panel says why. */
export const FINAL_CODES = new Set(['token_revoked', 'token_expired', 'token_invalid',
  'token_missing', 'wrong_session', 'wrong_role', 'unknown_session']);

/**
 * GET (or another method, with a JSON body) a review API path with the bearer token.
 * @param {string} path @param {string} token @param {string} [method] @param {any} [body]
 */
export async function api(path, token, method = 'GET', body = undefined) {
  /** @type {Record<string, string>} */
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, { method, headers, cache: 'no-store',
    body: body === undefined ? undefined : JSON.stringify(body) });
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    answer = null;
  }
  if (!response.ok) {
    throw new ScrubinError(answer && answer.code ? answer : { code: 'http_error',
      message: `HTTP ${response.status}`, fault: 'server', status: response.status });
  }
  return answer;
}

/** `m:ss` or `h:mm:ss`. @param {number} seconds */
export function formatDuration(seconds) {
  const s = Math.max(0, Math.floor(Number(seconds) || 0));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, '0');
  return h ? `${h}:${String(m).padStart(2, '0')}:${sec}` : `${m}:${sec}`;
}

/** A local date and time. @param {string|null|undefined} iso */
export function formatWhen(iso) {
  if (!iso) return '';
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return '';
  return date.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
}

export const SCOPE_LABELS = /** @type {Record<string, string>} */ ({
  internal_review: 'Internal review',
  deidentified_reuse: 'De-identified reuse',
});

export const STATE_LABELS = /** @type {Record<string, string>} */ ({
  recording: 'Recording now',
  stopping: 'Finishing',
  stopped: '',
  failed: 'Incomplete (failed)',
  interrupted: 'Incomplete (interrupted)',
});

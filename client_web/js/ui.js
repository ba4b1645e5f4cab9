// @ts-check
/**
 * Small DOM helpers shared by the pages. Everything that comes from the
 * server or a user (names, titles, messages) goes in as text, never markup.
 */

import { tokenClaims } from './token.js';

/**
 * @template {Element} [T=HTMLElement]
 * @param {string} selector
 * @param {ParentNode} [root]
 * @returns {T}
 */
export function $(selector, root = document) {
  const found = root.querySelector(selector);
  if (!found) throw new Error(`missing element ${selector}`);
  return /** @type {T} */ (found);
}

/**
 * Create an element with attributes and text/element children.
 * @param {string} tag
 * @param {Record<string, string|boolean|number|undefined|null>} [attrs]  `class`, `data-*`, aria…
 * @param {...(Node|string|null|undefined|false)} children  strings become text nodes
 * @returns {HTMLElement}
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === 'string' ? document.createTextNode(child) : child);
  }
  return node;
}

/** Clone the first element of a <template>. */
export function fromTemplate(/** @type {string} */ id) {
  const template = /** @type {HTMLTemplateElement} */ ($(`#${id}`));
  return /** @type {HTMLElement} */ (
    /** @type {HTMLElement} */ (template.content.firstElementChild).cloneNode(true));
}

/** Human labels for the client's connection states. */
export const CONNECTION_LABELS = {
  idle: 'Not connected',
  connecting: 'Connecting…',
  open: 'Connected',
  reconnecting: 'Reconnecting…',
  ended: 'Session ended',
  failed: 'Cannot connect',
  closed: 'Disconnected',
};

/** The status pill while a page-wide state panel is up. */
export const PAGE_STATE_LABELS = {
  revoked: 'Access withdrawn',
  ended: 'Session ended',
  not_started: 'Not started yet',
  reconnecting: 'Reconnecting…',
  failed: 'Cannot join',
};

/**
 * Show the client's connection state in a status pill.
 * @param {HTMLElement} pill
 * @param {keyof typeof CONNECTION_LABELS} state
 */
export function showConnection(pill, state) {
  pill.dataset.state = state;
  pill.textContent = CONNECTION_LABELS[state] || state;
}

/** A dismissible error banner at the top of the page (role=alert). */
export class Banner {
  /** @param {HTMLElement} root */
  constructor(root) {
    this.root = root;
    this.text = $('.banner-text', root);
    this.timer = undefined;
    $('.banner-close', root).addEventListener('click', () => this.hide());
  }

  /**
   * @param {string} message
   * @param {{level?: 'error'|'info', sticky?: boolean}} [options]
   */
  show(message, { level = 'error', sticky = false } = {}) {
    this.text.textContent = message;
    this.root.dataset.level = level;
    this.root.hidden = false;
    clearTimeout(this.timer);
    if (!sticky) this.timer = setTimeout(() => this.hide(), 12000);
  }

  hide() {
    clearTimeout(this.timer);
    this.root.hidden = true;
  }
}

/**
 * A readable sentence for an error object from the protocol.
 * @param {{code?: string, message?: string, fault?: string}} error
 */
export function describeError(error) {
  const message = error.message || error.code || 'Something went wrong';
  switch (error.fault) {
    case 'server':
      return `${message} (server problem, retrying may help)`;
    case 'protocol':
      return `${message} (client error: please report it)`;
    default:
      return message;
  }
}

/**
 * Why a page could not join, in words for a surgeon or trainee.
 * @param {{code?: string, message?: string, fault?: string}} error
 */
export function joinFailure(error) {
  switch (error.code) {
    case 'token_expired':
      return 'This link has expired. Ask the organiser for a new one.';
    case 'token_invalid':
    case 'token_missing':
      return 'This link is not valid. Check that you opened the whole link, or ask for a new one.';
    case 'unknown_session':
      return 'This session is not on this server (it may have finished). Ask the organiser.';
    case 'wrong_session':
      return 'This link belongs to another session.';
    case 'wrong_role':
    case 'not_allowed':
      return `This link does not give access to the live session (${error.message || error.code}).`;
    case 'session_ended':
      return 'This session has ended.';
    case 'token_revoked':
      return 'This link has been withdrawn. Ask the organiser for a new one.';
    default:
      return describeError(error);
  }
}

/**
 * @typedef {'revoked'|'ended'|'not_started'|'reconnecting'|'failed'} PageStateKind
 * @typedef {{kind: PageStateKind, title: string, text: string}} PageState
 */

/**
 * The one way every page says where the participant stands when it cannot (or
 * can no longer) take part: the same kinds, titles and words everywhere.
 * @param {{code?: string, message?: string, fault?: string}} error
 * @param {number|null} [startsAt]  epoch seconds, for `session_not_started`
 * @returns {PageState}
 */
export function pageStateFor(error, startsAt = null) {
  switch (error.code) {
    case 'token_revoked':
      return { kind: 'revoked', title: 'Your access was withdrawn',
        text: 'The organiser withdrew this link. If you should still take part, ask them for a '
          + 'new one.' };
    case 'session_ended':
      return endedState(error.message && !/^session \S+ has ended$/.test(error.message)
        ? error.message : '');
    case 'session_not_started':
      return notStartedState(startsAt);
    case 'invite_used_up':
      return { kind: 'failed', title: 'Cannot join this session',
        text: 'This invite is personal and has been used on as many devices as it allows. '
          + 'Ask the organiser for a link of your own.' };
    case 'not_an_invite':
      return { kind: 'failed', title: 'Cannot join this session',
        text: 'This is not an invite link. Ask the organiser for an invite of your own.' };
    default:
      return { kind: 'failed', title: 'Cannot join this session', text: joinFailure(error) };
  }
}

/** @param {string} [reason] why it ended, as the server said @returns {PageState} */
export function endedState(reason = '') {
  return { kind: 'ended', title: 'The session has ended',
    text: reason ? `${reason.charAt(0).toUpperCase()}${reason.slice(1)}.` : 'Thank you for taking part.' };
}

/**
 * @param {number|null} startsAt  epoch seconds, or null when no time was set
 * @param {number} [now]  ms
 * @returns {PageState}
 */
export function notStartedState(startsAt, now = Date.now()) {
  const joins = 'This page joins by itself as soon as it starts.';
  if (!startsAt) {
    return { kind: 'not_started', title: 'The session has not started yet', text: joins };
  }
  const at = new Date(startsAt * 1000);
  const sameDay = at.toDateString() === new Date(now).toDateString();
  const time = at.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  const when = sameDay ? time : `${at.toLocaleDateString([], {
    weekday: 'short', day: 'numeric', month: 'short' })}, ${time}`;
  return { kind: 'not_started', title: `The session starts at ${when}`,
    text: `${startsIn(startsAt * 1000 - now)} ${joins}` };
}

/** "Starts in 25 min." @param {number} ms */
function startsIn(ms) {
  if (ms <= 60_000) return 'It should start any moment now.';
  const minutes = Math.round(ms / 60_000);
  if (minutes < 60) return `That is in ${minutes} min.`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return `That is in ${hours} h ${minutes % 60} min.`;
  return `That is in ${Math.round(hours / 24)} days.`;
}

/**
 * The page-wide state panel (`#ended`, with `#ended-title` and `#ended-reason`):
 * shown for revoked, ended, not-yet-started and cannot-join; the page behind it
 * is made inert, so no control stays clickable or busy-looking under it.
 */
export class StatePanel {
  /** @param {HTMLElement} root */
  constructor(root) {
    this.root = root;
    /** @type {PageStateKind|null} */
    this.kind = null;
    /** @type {number|null|undefined} when the Session starts, once asked (epoch s) */
    this.startsAt = undefined;
    /** @type {ReturnType<typeof setInterval>|undefined} */
    this.timer = undefined;
  }

  /** @param {PageState} state */
  show(state) {
    this.kind = state.kind;
    this.root.dataset.kind = state.kind;
    $('#ended-title', this.root).textContent = state.title;
    $('#ended-reason', this.root).textContent = state.text;
    // The panel lives outside any full-screen element: leave full screen to show it.
    if (document.fullscreenElement) document.exitFullscreen().catch(() => {});
    this.root.hidden = false;
    document.body.dataset.pageState = state.kind;
    const pill = document.querySelector('#conn-state');
    if (pill instanceof HTMLElement) {
      pill.dataset.state = state.kind === 'not_started' ? 'waiting' : state.kind;
      pill.textContent = PAGE_STATE_LABELS[state.kind];
    }
    for (const part of document.querySelectorAll('main, .topbar-actions')) {
      /** @type {HTMLElement} */ (part).inert = true;
    }
    // The panel says it all: no "connecting" or "reconnecting" behind it.
    for (const busy of document.querySelectorAll('#conn-strip, main .overlay')) {
      /** @type {HTMLElement} */ (busy).hidden = true;
    }
    const banner = document.querySelector('#banner');
    if (banner instanceof HTMLElement) banner.hidden = true;
    const sub = document.querySelector('#session-sub');
    if (sub && sub.textContent?.endsWith('…')) sub.textContent = PAGE_STATE_LABELS[state.kind];
  }

  /** Back to the live page (a scheduled Session started). */
  hide() {
    this.kind = null;
    this.root.hidden = true;
    delete document.body.dataset.pageState;
    for (const part of document.querySelectorAll('main, .topbar-actions')) {
      /** @type {HTMLElement} */ (part).inert = false;
    }
  }

  /** A state the page cannot leave by itself (everything but not-started). */
  get final() {
    return this.kind !== null && this.kind !== 'not_started';
  }

  /**
   * A scheduled Session refused the join (`session_not_started`; the client
   * keeps trying): say when it starts, refreshed every half minute, until
   * `waiting()` turns false (welcomed) or a final state replaces it.
   * @param {string} token  the page's token (its Session, and to ask when it starts)
   * @param {() => boolean} waiting
   */
  async showNotStarted(token, waiting) {
    if (this.startsAt === undefined) {
      this.startsAt = null;
      const schedule = await sessionSchedule(String(tokenClaims(token).sid || ''), token);
      this.startsAt = schedule?.startsAt ?? null;
      const title = document.querySelector('#session-title');
      if (schedule?.title && title) title.textContent = schedule.title;
    }
    if (!waiting() || this.final) return;
    this.show(notStartedState(this.startsAt ?? null));
    clearInterval(this.timer);
    this.timer = setInterval(() => {
      if (this.kind === 'not_started' && waiting()) this.show(notStartedState(this.startsAt ?? null));
      else clearInterval(this.timer);
    }, 30_000);
  }
}

/**
 * A Session's state and, while it is scheduled, when it starts (`GET
 * /api/sessions/{id}`); null if that cannot be read.
 * @param {string} sessionId @param {string} token
 * @returns {Promise<{state: string, title: string, startsAt: number|null}|null>}
 */
export async function sessionSchedule(sessionId, token) {
  if (!sessionId) return null;
  try {
    const response = await fetch(`/api/sessions/${encodeURIComponent(sessionId)}`, {
      headers: { Authorization: `Bearer ${token}` }, cache: 'no-store', credentials: 'omit' });
    if (!response.ok) return null;
    const session = (await response.json())?.session;
    const startsAt = Number(session?.starts_at);
    return { state: String(session?.state || ''), title: String(session?.title || ''),
      startsAt: Number.isFinite(startsAt) && startsAt > 0 ? startsAt : null };
  } catch {
    return null;
  }
}

/**
 * Whether a failed call is worth trying again: the network failed (fetch
 * rejects with a TypeError) or the server said it was its own trouble (5xx).
 * @param {unknown} err
 */
export function transientFailure(err) {
  if (err instanceof TypeError) return true;
  const e = /** @type {{status?: number, error?: {status?: number}}|null} */ (err);
  const status = Number(e?.status ?? e?.error?.status ?? 0);
  return status >= 500;
}

/**
 * The fetch-based pages (library, player, join, admin) reconnect as the live
 * pages do: a call the network failed is tried again with backoff while the
 * reconnecting strip (`#conn-strip`) says so; any other failure is thrown.
 * @template T
 * @param {() => Promise<T>} call
 * @returns {Promise<T>}
 */
export async function withReconnect(call) {
  const strip = document.querySelector('#conn-strip');
  for (let attempt = 0; ; attempt++) {
    try {
      const result = await call();
      if (strip instanceof HTMLElement) strip.hidden = true;
      return result;
    } catch (err) {
      if (!transientFailure(err) || !(strip instanceof HTMLElement)) {
        if (strip instanceof HTMLElement) strip.hidden = true;
        throw err;
      }
      const delay = Math.min(10_000, 1000 * 2 ** Math.min(attempt, 4));
      strip.textContent = `Cannot reach the server. Reconnecting… (next try in ${
        Math.round(delay / 1000)} s)`;
      strip.hidden = false;
      await new Promise((resolve) => { setTimeout(resolve, delay); });
    }
  }
}

/**
 * Attach a stream to a media element and start it; playback failures are
 * returned, not thrown, so they never surface as unhandled rejections.
 * @param {HTMLMediaElement} media
 * @param {MediaStream|null} stream
 * @returns {Promise<Error|null>}
 */
export async function attachStream(media, stream) {
  if (media.srcObject !== stream) media.srcObject = stream;
  if (!stream) return null;
  try {
    await media.play();
    return null;
  } catch (err) {
    return /** @type {Error} */ (err);
  }
}

/** A human name for a slot id: `endoscope` → `Endoscope`. */
export function slotTitle(/** @type {string} */ slot) {
  const words = slot.replace(/[-_]+/g, ' ');
  return words.charAt(0).toUpperCase() + words.slice(1);
}

/**
 * Ask for confirmation in a <dialog> (no window.confirm: it blocks the page
 * and its media on some tablets).
 * @param {HTMLDialogElement} dialog  with buttons value="cancel" / value="confirm"
 * @returns {Promise<boolean>}
 */
export function confirmDialog(dialog) {
  return new Promise((resolve) => {
    const onClose = () => {
      dialog.removeEventListener('close', onClose);
      resolve(dialog.returnValue === 'confirm');
    };
    dialog.returnValue = '';
    dialog.addEventListener('close', onClose);
    dialog.showModal();
  });
}

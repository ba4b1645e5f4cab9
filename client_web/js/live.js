// @ts-check
/**
 * Interaction panels shared by the broadcast and watch pages: chat, question
 * lists, step lists, toasts. Every text from the server or a user goes in with
 * textContent (through `el`), never as markup.
 */

import { el } from './ui.js';

/** @typedef {import('./protocol.js').Question} Question */
/** @typedef {import('./protocol.js').ChatMessage} ChatMessage */

/** Session clock as m:ss or h:mm:ss. @param {number} t seconds */
export function clock(t) {
  const s = Math.max(0, Math.floor(t));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, '0');
  return h ? `${h}:${String(m).padStart(2, '0')}:${sec}` : `${m}:${sec}`;
}

/** Short-lived notices in a corner (role=status, polite). */
export class Toasts {
  /** @param {HTMLElement} root */
  constructor(root) {
    this.root = root;
  }

  /**
   * @param {string} text
   * @param {{level?: 'info'|'warn', ms?: number}} [options]
   */
  show(text, { level = 'info', ms = 4000 } = {}) {
    const toast = el('div', { class: 'toast', 'data-level': level }, text);
    this.root.append(toast);
    while (this.root.children.length > 4) this.root.firstElementChild?.remove();
    setTimeout(() => toast.remove(), ms);
  }
}

/**
 * The chat log, newest at the bottom (kept scrolled there unless the reader
 * scrolled up).
 * @param {HTMLElement} list
 * @param {ChatMessage[]} messages
 * @param {string|undefined} selfId
 */
export function renderChat(list, messages, selfId) {
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.replaceChildren(...messages.map((m) => el('li', {
    class: 'chat-item', 'data-role': m.by.role, 'data-self': String(m.by.id === selfId),
  },
  el('span', { class: 'chat-meta' },
    el('span', { class: 'chat-name' }, m.by.name || m.by.role),
    el('span', { class: 'chat-time muted' }, clock(m.t))),
  el('span', { class: 'chat-text' }, m.text))));
  if (atBottom) list.scrollTop = list.scrollHeight;
}

/** Open first (most votes, then oldest), then answered and dismissed. @param {Question[]} questions */
export function sortQuestions(questions) {
  const rank = { open: 0, answered: 1, dismissed: 2 };
  return [...questions].sort((a, b) => rank[a.status] - rank[b.status]
    || (a.status === 'open' ? b.votes - a.votes || a.t - b.t : b.t - a.t));
}

/** @type {Record<string, string>} */
const STATUS_LABELS = { open: 'Open', answered: 'Answered', dismissed: 'Dismissed' };

/**
 * One question as a list item; `actions` are buttons for this page.
 * @param {Question} q
 * @param {...HTMLElement} actions
 */
export function questionItem(q, ...actions) {
  return el('li', { class: 'question', 'data-status': q.status, 'data-id': q.id,
    'data-held': String(Boolean(q.held)) },
  el('p', { class: 'question-text' }, q.text),
  el('div', { class: 'question-meta' },
    el('span', { class: 'question-author muted' }, `${q.author.name} · ${clock(q.t)}`),
    el('span', { class: 'question-votes', title: 'Votes' }, `▲ ${q.votes}`),
    q.status !== 'open' ? el('span', { class: 'pill', 'data-state': q.status },
      STATUS_LABELS[q.status]) : null,
    q.held ? el('span', { class: 'pill', 'data-state': 'held' }, 'Held') : null,
    ...actions));
}

/**
 * A small button.
 * @param {string} label
 * @param {() => void} onClick
 * @param {Record<string, string>} [attrs]
 */
export function button(label, onClick, attrs = {}) {
  const b = /** @type {HTMLButtonElement} */ (el('button', { type: 'button', class: 'btn small', ...attrs }, label));
  b.addEventListener('click', onClick);
  return b;
}

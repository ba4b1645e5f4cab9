// @ts-check
/**
 * The join page: an invite link (`/join.html#token=…`) becomes a personal
 * token for this device, then the Role's page opens with it.
 *
 * The display name comes with the invite, or is asked here once (and
 * remembered on this device for the next invite). A random device id, kept
 * in localStorage, makes this device one use of an invite with a use limit:
 * opening the same link again on it is not another use.
 */

import { $, pageStateFor, withReconnect } from './ui.js';
import { forgetToken, takeToken, tokenClaims } from './token.js';

const DEVICE_KEY = 'scrubin.device';
const NAME_KEY = 'scrubin.name';

const ROLE_WORDS = {
  expert: 'You are invited to broadcast this session as its expert.',
  trainee: 'You are invited to watch this session live.',
  admin: 'You are invited to watch and moderate this session.',
  recorder: 'This link is for a recorder.',
  reviewer: 'You are invited as a reviewer (recordings).',
};

/** @param {string} key */
function load(key) {
  try {
    return localStorage.getItem(key) || '';
  } catch {
    return '';
  }
}

/** @param {string} key @param {string} value */
function save(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    /* storage disabled: asked again next time */
  }
}

/** A random id for this browser, kept across invites. */
function deviceId() {
  let id = load(DEVICE_KEY);
  if (!/^[0-9a-f]{32}$/.test(id)) {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    id = Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
    save(DEVICE_KEY, id);
  }
  return id;
}

/** @param {string} title @param {string} text @param {string} [kind] */
function status(title, text = '', kind = '') {
  $('#join-card').hidden = true;
  const card = $('#join-status');
  card.hidden = false;
  card.dataset.kind = kind;
  $('#status-title').textContent = title;
  $('#status-text').textContent = text;
}

/** Revoked, ended or refused: the same words as every other page. */
function failed(/** @type {{code?: string, message?: string, fault?: string}} */ error) {
  const state = pageStateFor(error);
  status(state.title, state.text, state.kind);
}

/** @param {string} token @param {string} name */
async function redeem(token, name) {
  status('Joining…');
  // The network (or a restarting server) failing is retried; a refusal is not.
  const response = await withReconnect(async () => {
    const answer = await fetch('/api/invites/redeem', {
      method: 'POST',
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ device: deviceId(), name }),
      cache: 'no-store',
      credentials: 'omit',
    });
    if (answer.status >= 500) {
      throw Object.assign(new Error(`HTTP ${answer.status}`), { status: answer.status });
    }
    return answer;
  });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok || !body) {
    failed(body || { code: 'http_error', message: `HTTP ${response.status}`, fault: 'server' });
    return;
  }
  forgetToken();
  if (!body.page) {
    status('You are registered', 'There is no live page for your role yet.');
    return;
  }
  status('Opening the session…');
  location.replace(body.page);
}

function main() {
  const token = takeToken();
  if (!token) {
    status('No invite', 'Open the whole invite link you were given (it ends with #token=…).');
    return;
  }
  const invite = tokenClaims(token);
  const role = String(invite.role || '');
  $('#join-role').textContent = ROLE_WORDS[/** @type {keyof typeof ROLE_WORDS} */ (role)] || '';
  if (invite.name) {
    // Named invite: nothing to ask.
    redeem(token, '');
    return;
  }
  const input = /** @type {HTMLInputElement} */ ($('#join-name'));
  input.value = load(NAME_KEY);
  $('#join-card').hidden = false;
  $('#join-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const name = input.value.trim().replace(/\s+/g, ' ');
    if (!name) return;
    save(NAME_KEY, name);
    redeem(token, name);
  });
  input.focus();
}

main();

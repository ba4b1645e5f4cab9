// @ts-check
/**
 * The admin page: Theatres, Sessions and their invite links, through the
 * admin API (docs/openapi.yaml) with a node-wide admin token.
 *
 * The token comes in the URL fragment (`#token=…`, scrubbed from the address
 * bar and kept for this tab only) or is pasted. Everything from the server
 * (titles, names) goes into the page as text, never markup.
 */

import { $, Banner, confirmDialog, describeError, el, pageStateFor, withReconnect } from './ui.js';
import { forgetToken, takeToken } from './token.js';

const STORAGE_KEY = 'scrubin.token:/admin.html';

/** @type {string} */
let token = '';
/** @type {Array<{id: string, name: string, slots: string[]}>} */
let theatres = [];
/** @type {string|null} */
let selected = null;

const banner = new Banner($('#banner'));

/** An error the API answered with. */
class ApiError extends Error {
  /** @param {{code?: string, message?: string, fault?: string, status?: number}} error */
  constructor(error) {
    super(error.message || error.code || 'request failed');
    this.error = error;
  }
}

/**
 * @param {string} method
 * @param {string} path
 * @param {object} [body]
 * @returns {Promise<any>}
 */
async function api(method, path, body) {
  /** @type {Record<string, string>} */
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store', credentials: 'omit',
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    throw new ApiError(data && typeof data === 'object' ? data
      : { code: 'http_error', message: `HTTP ${response.status}`, status: response.status });
  }
  return data;
}

/** @param {unknown} err */
function report(err) {
  if (err instanceof ApiError) {
    const status = err.error.status;
    if (status === 401) {
      const state = pageStateFor(err.error); // the same words as every other page
      showTokenForm(`${state.title}: ${state.text} Paste a new admin token.`);
      return;
    }
    banner.show(describeError(err.error));
  } else {
    banner.show(`Could not reach the server: ${/** @type {Error} */ (err).message || err}`);
  }
}

/** @param {number|null|undefined} seconds */
function when(seconds) {
  if (!seconds) return '—';
  return new Date(seconds * 1000).toLocaleString(undefined, {
    year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit',
  });
}

/** The join link on the origin this page was opened from. @param {string} invite */
function joinLink(invite) {
  return `${location.origin}/join.html#token=${invite}`;
}

/**
 * Copy text; the clipboard API needs a secure context, so fall back to a
 * selected input.
 * @param {string} text
 * @param {HTMLInputElement} [input]
 */
async function copy(text, input) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    if (input) {
      input.focus();
      input.select();
      try {
        return document.execCommand('copy');
      } catch {
        return false;
      }
    }
    return false;
  }
}

/** @param {HTMLButtonElement} button @param {boolean} ok */
function flash(button, ok) {
  const label = button.textContent;
  button.textContent = ok ? 'Copied' : 'Select and copy';
  button.dataset.copied = ok ? 'true' : 'false';
  setTimeout(() => {
    button.textContent = label;
    delete button.dataset.copied;
  }, 1800);
}

// -- token ------------------------------------------------------------------------

/** @param {string} [why] */
function showTokenForm(why) {
  token = '';
  forgetToken();
  $('#token-card').hidden = false;
  $('#workspace').hidden = true;
  $('#refresh').hidden = true;
  $('#forget').hidden = true;
  $('#who').textContent = 'Theatres, sessions and invite links';
  if (why) banner.show(why);
}

/** @param {string} value */
async function useToken(value) {
  token = value.trim();
  if (!token) {
    showTokenForm();
    return;
  }
  try {
    sessionStorage.setItem(STORAGE_KEY, token);
  } catch {
    /* storage disabled: the token lives as long as the page */
  }
  $('#token-card').hidden = true;
  $('#workspace').hidden = false;
  $('#refresh').hidden = false;
  $('#forget').hidden = false;
  const claims = decodeClaims(token);
  $('#who').textContent = claims.name ? `Signed in as ${claims.name}` : 'Admin';
  await refresh();
}

/** The token's claims, for display only (the server verifies). @param {string} jwt */
function decodeClaims(jwt) {
  try {
    const part = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const json = decodeURIComponent(Array.from(atob(part),
      (c) => `%${c.charCodeAt(0).toString(16).padStart(2, '0')}`).join(''));
    return JSON.parse(json);
  } catch {
    return {};
  }
}

// -- theatres and sessions ------------------------------------------------------------

async function refresh() {
  try {
    // The network (or a restarting Node) failing is retried with the strip up.
    await withReconnect(async () => {
      await loadTheatres();
      await loadSessions();
      if (selected) {
        await loadInvites();
        await loadAttendance();
      }
    });
    banner.hide();
  } catch (err) {
    report(err);
  }
}

async function loadTheatres() {
  theatres = (await api('GET', '/api/admin/theatres')).theatres;
  const rows = $('#theatre-rows');
  rows.replaceChildren(...theatres.map((t) => el('tr', { 'data-theatre': t.id },
    el('td', {}, el('code', {}, t.id)), el('td', {}, t.name), el('td', {}, t.slots.join(', ')))));
  $('#theatres-empty').hidden = theatres.length > 0;
  const select = /** @type {HTMLSelectElement} */ ($('#session-theatre'));
  const previous = select.value;
  select.replaceChildren(...theatres.map((t) => el('option', { value: t.id }, `${t.name} (${t.id})`)));
  if (theatres.some((t) => t.id === previous)) select.value = previous;
}

async function loadSessions() {
  const state = /** @type {HTMLSelectElement} */ ($('#state-filter')).value;
  const { sessions } = await api('GET', `/api/admin/sessions${state ? `?state=${state}` : ''}`);
  const rows = $('#session-rows');
  rows.replaceChildren(...sessions.map((/** @type {any} */ s) => sessionRow(s)));
  $('#sessions-empty').hidden = sessions.length > 0;
}

/** @type {Record<string, string>} */
const SESSION_STATE_LABELS = { scheduled: 'Not started', live: 'Live', ended: 'Ended' };

/** @param {any} s */
function sessionRow(s) {
  const invitesButton = el('button', { class: 'btn', type: 'button', 'data-action': 'invites' },
    'Invites');
  invitesButton.addEventListener('click', () => selectSession(s));
  const actions = el('div', { class: 'row-actions' }, invitesButton);
  if (s.state === 'scheduled') {
    const start = el('button', { class: 'btn', type: 'button', 'data-action': 'start' }, 'Start');
    start.addEventListener('click', () => act(`/api/admin/sessions/${s.id}/start`, 'POST'));
    actions.append(start);
  }
  if (s.state !== 'ended') {
    const end = el('button', { class: 'btn danger', type: 'button', 'data-action': 'end' },
      s.state === 'scheduled' ? 'Cancel' : 'End');
    end.addEventListener('click', () => act(`/api/admin/sessions/${s.id}/end`, 'POST', [
      s.state === 'scheduled' ? 'Cancel this session?' : 'End this session for everyone?',
      `${s.title} (${s.id}). Its links stop working for live access.`,
      s.state === 'scheduled' ? 'Cancel session' : 'End session']));
    actions.append(end);
  }
  const title = el('td', {},
    el('strong', {}, s.title),
    el('div', { class: 'muted small' }, [s.id, s.procedure, s.expert].filter(Boolean).join(' · ')));
  const scheduled = s.starts_at ? `${when(s.starts_at)} – ${when(s.ends_at)}` : '—';
  return el('tr', { 'data-session': s.id, 'data-selected': s.id === selected ? 'true' : null },
    title, el('td', {}, s.theatre), el('td', {}, scheduled),
    el('td', {}, el('span', { class: 'pill', 'data-state': s.state === 'live' ? 'live' : s.state },
      SESSION_STATE_LABELS[s.state] || s.state)),
    el('td', {}, actions));
}

/**
 * Ask first (a <dialog>, not window.confirm).
 * @param {string} title @param {string} text @param {string} action
 */
async function confirmed(title, text, action) {
  $('#confirm-title').textContent = title;
  $('#confirm-text').textContent = text;
  $('#confirm-ok').textContent = action;
  return confirmDialog(/** @type {HTMLDialogElement} */ ($('#confirm')));
}

/**
 * @param {string} path @param {string} method
 * @param {[string, string, string]} [ask]  title, text, button
 */
async function act(path, method, ask) {
  if (ask && !(await confirmed(...ask))) return;
  try {
    await api(method, path);
    await refresh();
  } catch (err) {
    report(err);
  }
}

/** @param {any} s */
async function selectSession(s) {
  selected = s.id;
  $('#invites-card').hidden = false;
  $('#new-invite').hidden = true;
  $('#invites-session').textContent = `${s.title} (${s.id}, ${s.state})`;
  for (const row of document.querySelectorAll('#session-rows tr')) {
    const tr = /** @type {HTMLElement} */ (row);
    if (tr.dataset.session === selected) tr.dataset.selected = 'true';
    else delete tr.dataset.selected;
  }
  $('#attendance-card').hidden = false;
  /** @type {HTMLButtonElement} */ ($('#attendance-confirm')).disabled = s.state !== 'ended';
  try {
    await loadInvites();
    await loadAttendance();
  } catch (err) {
    report(err);
  }
  $('#invites-card').scrollIntoView({ behavior: 'smooth', block: 'start' });
}

// -- invites -----------------------------------------------------------------------------

async function loadInvites() {
  if (!selected) return;
  const { invites } = await api('GET', `/api/admin/sessions/${selected}/invites`);
  const rows = $('#invite-rows');
  rows.replaceChildren(...invites.map((/** @type {any} */ i) => inviteRow(i)));
  $('#invites-empty').hidden = invites.length > 0;
}

/** @param {any} invite */
function inviteRow(invite) {
  const actions = el('div', { class: 'row-actions' });
  if (invite.revoked) {
    actions.append(el('span', { class: 'pill', 'data-state': 'failed' }, 'revoked'));
  } else {
    const copyButton = el('button', { class: 'btn', type: 'button', 'data-action': 'copy' },
      'Copy link');
    copyButton.addEventListener('click', async () => {
      flash(/** @type {HTMLButtonElement} */ (copyButton), await copy(joinLink(invite.token)));
    });
    const revoke = el('button', { class: 'btn danger', type: 'button', 'data-action': 'revoke' },
      'Revoke');
    revoke.addEventListener('click', () => act(
      `/api/admin/sessions/${invite.session}/invites/${invite.id}`, 'DELETE', [
        'Revoke this invite?',
        `Everyone who joined with it (${invite.role}${invite.name ? `, ${invite.name}` : ''}) `
          + 'is disconnected and cannot come back with it.',
        'Revoke']));
    actions.append(copyButton, revoke);
  }
  const seats = invite.seats || { taken: invite.uses, available: null };
  const uses = `${seats.taken} / ${invite.max_uses ?? '∞'}`;
  const free = seats.available === null ? '' : ` (${seats.available} free)`;
  const expires = el('td', {}, when(invite.expires_at));
  const after = invite.expires_after_start_s;
  if (invite.expires_before_start) {
    expires.append(el('div', { class: 'pill', 'data-state': 'failed', 'data-warning': 'expires-early' },
      `expires ${span(-after)} before the start`));
  } else if (typeof after === 'number') {
    expires.append(el('div', { class: 'muted small' }, `${span(after)} after the start`));
  }
  return el('tr', { 'data-invite': invite.id },
    el('td', {}, el('span', { class: 'badge', 'data-role': invite.role }, invite.role)),
    el('td', {}, invite.name || el('span', { class: 'muted' }, 'asked when joining')),
    el('td', { title: `${seats.taken} of ${invite.max_uses ?? 'any number of'} devices` }, uses + free),
    expires, el('td', {}, actions));
}

/** @param {SubmitEvent} event */
async function createInvite(event) {
  event.preventDefault();
  if (!selected) return;
  const form = /** @type {HTMLFormElement} */ (event.target);
  const data = new FormData(form);
  /** @type {Record<string, unknown>} */
  const body = { role: data.get('role'), name: String(data.get('name') || '').trim() };
  const hours = Number(data.get('hours'));
  if (hours > 0) body.ttl_s = Math.max(60, Math.round(hours * 3600));
  const maxUses = String(data.get('max_uses') || '').trim();
  if (maxUses) body.max_uses = Number(maxUses);
  try {
    let created;
    try {
      created = await api('POST', `/api/admin/sessions/${selected}/invites`, body);
    } catch (err) {
      // Warned before it is made: an invite that dies before the start admits nobody.
      if (!(err instanceof ApiError) || err.error.code !== 'invite_expires_early') throw err;
      if (!(await confirmed('This invite expires before the session starts', err.message,
        'Create it anyway'))) return;
      created = await api('POST', `/api/admin/sessions/${selected}/invites`,
        { ...body, allow_expiring: true });
    }
    const input = /** @type {HTMLInputElement} */ ($('#new-invite-link'));
    input.value = joinLink(created.token);
    $('#new-invite').hidden = false;
    await loadInvites();
    input.focus();
    input.select();
  } catch (err) {
    report(err);
  }
}

/** "2 h 5 min" from seconds. @param {number} seconds */
function span(seconds) {
  let minutes = Math.floor(Math.abs(seconds) / 60);
  const days = Math.floor(minutes / 1440);
  minutes -= days * 1440;
  const hours = Math.floor(minutes / 60);
  minutes -= hours * 60;
  return [days ? `${days} d` : '', hours ? `${hours} h` : '', `${minutes} min`]
    .filter(Boolean).join(' ');
}

// -- attendance and certificates -----------------------------------------------------------

async function loadAttendance() {
  if (!selected) return;
  const view = await api('GET', `/api/sessions/${selected}/attendance`);
  $('#attendance-summary').textContent = `${view.length_min} min so far · main camera: `
    + `${view.main_camera} · certificates from ${Math.round(view.min_share * 100)} % present`;
  /** @type {HTMLButtonElement} */ ($('#attendance-confirm')).disabled = view.state !== 'ended';
  const rows = $('#attendance-rows');
  rows.replaceChildren(...view.participants.map((/** @type {any} */ p) => attendanceRow(p)));
  $('#attendance-empty').hidden = view.participants.length > 0;
}

/** @param {any} p */
function attendanceRow(p) {
  const cert = el('td', {});
  if (p.certificate) {
    const pdf = el('button', { class: 'btn', type: 'button', 'data-action': 'pdf' }, 'PDF');
    pdf.addEventListener('click', () => download(
      `/api/sessions/${selected}/certificates/${p.certificate}/pdf`, `certificate-${p.name}.pdf`));
    const revoke = el('button', { class: 'btn danger', type: 'button', 'data-action': 'revoke-certificate' },
      'Revoke');
    revoke.addEventListener('click', async () => {
      await act(`/api/sessions/${selected}/certificates/${p.certificate}`, 'DELETE', [
        'Revoke this certificate?', `${p.name}: verification will say it was revoked.`, 'Revoke']);
      await loadAttendance().catch(report);
    });
    cert.append(el('div', { class: 'row-actions' }, pdf, revoke));
  } else {
    cert.append(el('span', { class: 'muted' }, '—'));
  }
  return el('tr', { 'data-participant': p.participant },
    el('td', {}, p.name), el('td', {}, el('span', { class: 'badge', 'data-role': p.role }, p.role)),
    el('td', {}, `${p.present_min} min`), el('td', {}, `${p.main_camera_min} min`),
    el('td', {}, `${Math.round(p.share * 100)} %`), el('td', {}, p.steps.join(' › ') || '—'),
    el('td', {}, p.questions.join(' | ') || '—'), cert);
}

/**
 * Fetch with the token and hand the browser a file.
 * @param {string} path @param {string} filename
 */
async function download(path, filename) {
  try {
    const response = await fetch(path, {
      headers: { Authorization: `Bearer ${token}` }, cache: 'no-store', credentials: 'omit',
    });
    if (!response.ok) throw new ApiError(await response.json());
    const url = URL.createObjectURL(await response.blob());
    const link = el('a', { href: url, download: filename });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  } catch (err) {
    report(err);
  }
}

async function confirmAttendance() {
  if (!selected) return;
  if (!(await confirmed('Confirm attendance?',
    'Every trainee present for at least the minimum share of the session gets a certificate '
      + 'of attendance.', 'Confirm'))) return;
  try {
    const result = await api('POST', `/api/sessions/${selected}/certificates`, {});
    banner.show(`${result.issued.length} certificate(s) issued.`);
    await loadAttendance();
  } catch (err) {
    report(err);
  }
}

// -- forms ---------------------------------------------------------------------------------

/** @param {SubmitEvent} event */
async function createTheatre(event) {
  event.preventDefault();
  const form = /** @type {HTMLFormElement} */ (event.target);
  const data = new FormData(form);
  const slots = String(data.get('slots') || '').split(',').map((s) => s.trim()).filter(Boolean);
  /** @type {Record<string, unknown>} */
  const body = { id: String(data.get('id') || '').trim(), slots };
  const name = String(data.get('name') || '').trim();
  if (name) body.name = name;
  try {
    await api('POST', '/api/admin/theatres', body);
    form.reset();
    await refresh();
  } catch (err) {
    report(err);
  }
}

/** @param {SubmitEvent} event */
async function createSession(event) {
  event.preventDefault();
  const form = /** @type {HTMLFormElement} */ (event.target);
  const data = new FormData(form);
  /** @type {Record<string, unknown>} */
  const body = {
    theatre: data.get('theatre'),
    title: String(data.get('title') || '').trim(),
    procedure: String(data.get('procedure') || '').trim(),
    expert: String(data.get('expert') || '').trim(),
  };
  const id = String(data.get('id') || '').trim();
  if (id) body.id = id;
  const startsAt = String(data.get('starts_at') || '');
  if (startsAt) body.starts_at = new Date(startsAt).getTime() / 1000;
  const duration = String(data.get('duration_min') || '').trim();
  if (duration && startsAt) body.duration_min = Number(duration);
  try {
    const { session } = await api('POST', '/api/admin/sessions', body);
    form.reset();
    await refresh();
    await selectSession(session);
  } catch (err) {
    report(err);
  }
}

function main() {
  $('#token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    useToken(/** @type {HTMLInputElement} */ ($('#token-input')).value);
  });
  $('#forget').addEventListener('click', () => {
    try {
      sessionStorage.removeItem(STORAGE_KEY);
    } catch {
      /* nothing stored */
    }
    showTokenForm();
  });
  $('#refresh').addEventListener('click', () => refresh());
  $('#attendance-refresh').addEventListener('click', () => loadAttendance().catch(report));
  $('#attendance-csv').addEventListener('click', () => {
    if (selected) download(`/api/sessions/${selected}/attendance?format=csv`, `attendance-${selected}.csv`);
  });
  $('#attendance-confirm').addEventListener('click', () => confirmAttendance());
  $('#state-filter').addEventListener('change', () => loadSessions().catch(report));
  $('#theatre-form').addEventListener('submit', (e) => createTheatre(/** @type {SubmitEvent} */ (e)));
  $('#session-form').addEventListener('submit', (e) => createSession(/** @type {SubmitEvent} */ (e)));
  $('#invite-form').addEventListener('submit', (e) => createInvite(/** @type {SubmitEvent} */ (e)));
  $('#copy-new-invite').addEventListener('click', async () => {
    const input = /** @type {HTMLInputElement} */ ($('#new-invite-link'));
    flash(/** @type {HTMLButtonElement} */ ($('#copy-new-invite')), await copy(input.value, input));
  });
  $('#revoke-all').addEventListener('click', () => {
    if (selected) {
      act(`/api/admin/sessions/${selected}/invites`, 'DELETE', [
        'Revoke every link of this session?',
        'Every invite and link issued until now stops working, the expert\'s included; '
          + 'everyone connected with one is disconnected. Create new invites afterwards.',
        'Revoke all']);
    }
  });

  const initial = takeToken();
  if (initial) useToken(initial);
  else showTokenForm();
}

main();

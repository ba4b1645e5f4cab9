// @ts-check
/**
 * The library: the Recordings a reviewer (or admin) token may watch, newest
 * first, each with its thumbnail, title, procedure, expert, date and length
 * (the same length the player shows: the recording's `duration`).
 * A node-wide admin token names the Session in the fragment (`&session=`).
 *
 * Admins also get, per recording, legal hold (put on with a reason, or
 * released) and deletion: asked first, refused while on hold, and answered
 * with every file removed and its sha256 (also in the audit trail).
 */

import {
  $, Banner, StatePanel, confirmDialog, describeError, fromTemplate, notStartedState,
  pageStateFor,
  sessionSchedule, withReconnect,
} from './ui.js';
import {
  FINAL_CODES, SCOPE_LABELS, STATE_LABELS, api, formatDuration, formatWhen, pageParams,
  tokenSession,
} from './review.js';

const banner = new Banner($('#banner'));
const panel = new StatePanel($('#ended'));
const list = $('#recording-list');
const empty = $('#library-empty');
const subtitle = $('#library-sub');
const status = $('#library-status');
const holdDialog = /** @type {HTMLDialogElement} */ ($('#hold-dialog'));
const holdReason = /** @type {HTMLTextAreaElement} */ ($('#hold-reason'));

const params = pageParams();
const token = params.token || '';
const claims = tokenSession(token);
const session = params.session || claims.session;
const isAdmin = claims.role === 'admin';

/** @type {any[]} */
let recordings = [];

async function load() {
  if (!token) {
    subtitle.textContent = 'Open this page from your reviewer link (it ends with #token=…).';
    return;
  }
  if (!session || session === '*') {
    subtitle.textContent = 'Name the session: add &session=ID to the link.';
    return;
  }
  try {
    const body = await withReconnect(
      () => api(`/api/sessions/${encodeURIComponent(session)}/recordings`, token));
    recordings = body.recordings;
    render();
  } catch (err) {
    const error = /** @type {any} */ (err);
    subtitle.textContent = 'The recordings could not be loaded.';
    if (FINAL_CODES.has(error.code)) panel.show(pageStateFor(error));
    else banner.show(describeError(error), { sticky: true });
    return;
  }
  if (!recordings.length) {
    // Before the Session: say when it starts, rather than only "nothing yet".
    const schedule = await sessionSchedule(session, token);
    if (schedule?.state === 'scheduled') {
      empty.textContent = `${notStartedState(schedule.startsAt).title.replace(
        'The session', 'This session')}. Its recordings appear here once it has been recorded.`;
    }
  }
}

/** @param {string} text */
function say(text) {
  status.textContent = text;
  status.hidden = !text;
}

/** Ask for the reason of a legal hold (null: cancelled). */
function askReason() {
  holdReason.value = '';
  return new Promise((resolve) => {
    const onClose = () => {
      holdDialog.removeEventListener('close', onClose);
      resolve(holdDialog.returnValue === 'confirm' ? holdReason.value.trim() || null : null);
    };
    holdDialog.returnValue = '';
    holdDialog.addEventListener('close', onClose);
    holdDialog.showModal();
  });
}
$('#hold-cancel').addEventListener('click', () => holdDialog.close('cancel'));

/** @param {any} recording */
async function toggleHold(recording) {
  const path = `/api/recordings/${encodeURIComponent(recording.id)}/hold`;
  try {
    if (recording.hold) {
      $('#confirm-title').textContent = 'Release the legal hold?';
      $('#confirm-text').textContent = 'The recording can then be deleted, by hand or when its retention period is over.';
      $('#confirm-ok').textContent = 'Release';
      if (!(await confirmDialog(/** @type {HTMLDialogElement} */ ($('#confirm'))))) return;
      await api(path, token, 'DELETE');
      recording.hold = null;
      say(`Legal hold released: ${recording.title || recording.id}.`);
    } else {
      const reason = await askReason();
      if (!reason) return;
      recording.hold = (await api(path, token, 'PUT', { reason })).hold;
      say(`On legal hold: ${recording.title || recording.id}.`);
    }
  } catch (err) {
    banner.show(describeError(/** @type {any} */ (err)));
  }
  render();
}

/** @param {any} recording */
async function remove(recording) {
  $('#confirm-title').textContent = 'Delete this recording?';
  $('#confirm-text').textContent = `Every camera, the sound, the events and the thumbnail of “${recording.title || recording.id}” (${formatWhen(recording.started)}) are deleted for good. The audit trail keeps what was deleted and its checksums.`;
  $('#confirm-ok').textContent = 'Delete';
  if (!(await confirmDialog(/** @type {HTMLDialogElement} */ ($('#confirm'))))) return;
  try {
    const body = await api(`/api/recordings/${encodeURIComponent(recording.id)}`, token, 'DELETE');
    recordings = recordings.filter((r) => r.id !== recording.id);
    const parts = body.files.filter((/** @type {any} */ f) => f.kind === 'part').length;
    say(`Deleted “${recording.title || recording.id}”: ${body.files.length} files (${parts} media parts)${body.verified ? ', checked gone' : ''}; their checksums are in the audit trail.`);
    if (window.scrubinLibrary) window.scrubinLibrary.lastDeleted = body;
  } catch (err) {
    banner.show(describeError(/** @type {any} */ (err)));
  }
  render();
}

function render() {
  subtitle.textContent = `Session ${session} · ${recordings.length} recording${recordings.length === 1 ? '' : 's'}`;
  empty.hidden = recordings.length > 0;
  list.replaceChildren();
  for (const recording of recordings) {
    const item = fromTemplate('recording-template');
    item.dataset.recording = recording.id;
    const link = /** @type {HTMLAnchorElement} */ ($('.recording-link', item));
    const fragment = new URLSearchParams({ token, recording: recording.id });
    link.href = `player.html#${fragment.toString()}`;
    const img = /** @type {HTMLImageElement} */ ($('.recording-img', item));
    if (recording.thumbnail) {
      img.src = recording.thumbnail;
      img.hidden = false;
      $('.recording-nothumb', item).hidden = true;
    }
    $('.recording-title', item).textContent = recording.title || recording.session;
    const [procedure, when] = item.querySelectorAll('.recording-meta');
    procedure.textContent = [recording.procedure, recording.expert].filter(Boolean).join(' · ');
    when.textContent = [formatWhen(recording.started),
      recording.duration !== null && recording.duration !== undefined
        ? formatDuration(recording.duration) : ''].filter(Boolean).join(' · ');
    $('.recording-scope', item).textContent = SCOPE_LABELS[recording.consent_scope] || '';
    const state = $('.recording-state', item);
    state.textContent = STATE_LABELS[recording.state] ?? String(recording.state || '');
    state.hidden = !state.textContent;
    state.dataset.state = recording.state === 'stopped' ? '' : 'failed';
    const hold = $('.recording-hold', item);
    hold.hidden = !recording.hold;
    if (recording.hold) hold.title = `Legal hold: ${recording.hold.reason}`;
    if (isAdmin) {
      $('.recording-actions', item).hidden = false;
      const toggle = /** @type {HTMLButtonElement} */ ($('.hold-toggle', item));
      toggle.textContent = recording.hold ? 'Release hold…' : 'Legal hold…';
      toggle.addEventListener('click', () => toggleHold(recording));
      const del = /** @type {HTMLButtonElement} */ ($('.recording-delete', item));
      del.disabled = Boolean(recording.hold) || recording.state === 'recording';
      del.title = recording.hold ? 'On legal hold: release it first' : '';
      del.addEventListener('click', () => remove(recording));
    }
    list.append(item);
  }
}

window.scrubinLibrary = { recordings: () => recordings, reload: load, lastDeleted: null };
load();

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
 *
 * De-identified exports: under each recording its copies for teaching with
 * their state (waiting, de-identifying with a progress bar and the time left,
 * pending review, signed off, rejected, failed), opened in the player to be
 * reviewed; admins make one ("De-identify…") and delete them. The page polls
 * while one is being made. Below, the signed-off copies shared with this
 * reviewer from every session.
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
import {
  EXPORT_STATE_LABELS, UNFINISHED, describeOptions, describeProgress, exportPath,
} from './exports.js';

const banner = new Banner($('#banner'));
const panel = new StatePanel($('#ended'));
const list = $('#recording-list');
const empty = $('#library-empty');
const subtitle = $('#library-sub');
const status = $('#library-status');
const holdDialog = /** @type {HTMLDialogElement} */ ($('#hold-dialog'));
const holdReason = /** @type {HTMLTextAreaElement} */ ($('#hold-reason'));
const deidentifyDialog = /** @type {HTMLDialogElement} */ ($('#deidentify-dialog'));
/** How often the page asks how the exports being made are going. */
const POLL_MS = 1000;

const params = pageParams();
const token = params.token || '';
const claims = tokenSession(token);
const session = params.session || claims.session;
const isAdmin = claims.role === 'admin';

/** @type {any[]} */
let recordings = [];
/** @type {any[]} the de-identified exports of this Session's recordings */
let exports = [];
/** @type {any[]} the signed-off exports shared with this token */
let shared = [];
let polling = /** @type {ReturnType<typeof setTimeout>|undefined} */ (undefined);

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
    await loadExports();
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

/** The exports (and the shared ones); polls again while one is being made. */
async function loadExports() {
  const [mine, theirs] = await Promise.all([
    api(`/api/sessions/${encodeURIComponent(session)}/exports`, token)
      .then((b) => b.exports).catch(() => exports),
    api('/api/exports/shared', token).then((b) => b.exports).catch(() => []),
  ]);
  exports = mine;
  shared = theirs;
  clearTimeout(polling);
  if (exports.some((e) => UNFINISHED.has(e.state))) {
    polling = setTimeout(async () => {
      await loadExports();
      render();
    }, POLL_MS);
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

/** Ask for a de-identified copy (admins). @param {any} recording */
async function deidentify(recording) {
  if (!(await confirmDialog(deidentifyDialog))) return;
  const checked = (/** @type {string} */ id) => /** @type {HTMLInputElement} */ ($(id)).checked;
  try {
    const body = await api(`/api/recordings/${encodeURIComponent(recording.id)}/exports`, token,
      'POST', { conservative: checked('#deidentify-conservative'),
        narration: checked('#deidentify-narration'), drawings: checked('#deidentify-drawings') });
    exports = [body.export, ...exports];
    say(`De-identifying “${recording.title || recording.id}”: it will be pending review when done.`);
    await loadExports();
  } catch (err) {
    banner.show(describeError(/** @type {any} */ (err)));
  }
  render();
}
$('#deidentify-cancel').addEventListener('click', () => deidentifyDialog.close('cancel'));

/** Delete a de-identified copy (admins). @param {any} item */
async function removeExport(item) {
  $('#confirm-title').textContent = 'Delete this de-identified copy?';
  $('#confirm-text').textContent = item.state === 'running' || item.state === 'queued'
    ? 'It is still being made: it stops, and what was made is deleted.'
    : 'Its files are deleted for good; the audit trail keeps their checksums.';
  $('#confirm-ok').textContent = 'Delete';
  if (!(await confirmDialog(/** @type {HTMLDialogElement} */ ($('#confirm'))))) return;
  try {
    const body = await api(exportPath(item.recording, item.id), token, 'DELETE');
    exports = exports.filter((e) => e.id !== item.id);
    say(`Deleted a de-identified copy: ${body.files.length} files, checked gone.`);
  } catch (err) {
    banner.show(describeError(/** @type {any} */ (err)));
  }
  render();
}

/** One export's line. @param {any} item @param {boolean} mine */
function exportItem(item, mine) {
  const node = fromTemplate('export-template');
  node.dataset.export = item.id;
  node.dataset.state = item.state;
  const state = $('.export-state', node);
  state.textContent = EXPORT_STATE_LABELS[item.state] || item.state;
  state.dataset.state = { failed: 'failed', rejected: 'failed', pending_review: 'starting',
    queued: 'connecting', running: 'connecting', signed_off: 'live' }[String(item.state)] || '';
  $('.export-shared', node).hidden = !item.shared;
  const when = mine ? formatWhen(item.requested?.at) : '';
  $('.export-title', node).textContent = mine ? 'De-identified copy'
    : (item.procedure || 'De-identified recording');
  $('.export-meta', node).textContent = [
    when, item.duration ? formatDuration(item.duration) : '', describeOptions(item),
    item.review?.by ? `${item.state === 'rejected' ? 'rejected' : 'signed off'} by ${item.review.by.name}` : '',
    item.review?.note && item.state === 'rejected' ? `“${item.review.note}”` : '',
    item.error ? `error: ${item.error}` : '',
  ].filter(Boolean).join(' · ');
  const running = UNFINISHED.has(item.state);
  $('.export-run', node).hidden = !running;
  const bar = /** @type {HTMLProgressElement} */ ($('.export-progress', node));
  bar.value = Number(item.progress?.fraction) || 0;
  $('.export-eta', node).textContent = describeProgress(item);
  const open = /** @type {HTMLAnchorElement} */ ($('.export-open', node));
  open.hidden = !['pending_review', 'signed_off', 'rejected'].includes(item.state);
  open.textContent = item.state === 'pending_review' ? 'Review' : 'Watch';
  open.href = `player.html#${new URLSearchParams({ token, recording: item.recording, export: item.id })}`;
  const del = /** @type {HTMLButtonElement} */ ($('.export-delete', node));
  del.hidden = !(mine && isAdmin);
  del.addEventListener('click', () => removeExport(item));
  return node;
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
    const copies = exports.filter((e) => e.recording === recording.id);
    const copyList = $('.recording-exports', item);
    copyList.hidden = copies.length === 0;
    copyList.replaceChildren(...copies.map((e) => exportItem(e, true)));
    if (isAdmin) {
      $('.recording-actions', item).hidden = false;
      const make = /** @type {HTMLButtonElement} */ ($('.deidentify', item));
      make.disabled = recording.state === 'recording';
      make.addEventListener('click', () => deidentify(recording));
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
  $('#shared').hidden = shared.length === 0;
  $('#shared-list').replaceChildren(...shared.map((e) => exportItem(e, false)));
}

window.scrubinLibrary = {
  recordings: () => recordings, exports: () => exports, shared: () => shared, reload: load,
  lastDeleted: null,
};
load();

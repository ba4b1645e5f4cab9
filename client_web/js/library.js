// @ts-check
/**
 * The library: the Recordings a reviewer (or admin) token may watch, newest
 * first, each with its thumbnail, title, procedure, expert, date and length.
 * A node-wide admin token names the Session in the fragment (`&session=`).
 */

import {
  $, Banner, StatePanel, describeError, fromTemplate, notStartedState, pageStateFor,
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

const params = pageParams();
const token = params.token || '';
const session = params.session || tokenSession(token).session;

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
    state.dataset.state = recording.state === 'stopped' ? '' : 'failed';
    list.append(item);
  }
}

window.scrubinLibrary = { recordings: () => recordings, reload: load };
load();

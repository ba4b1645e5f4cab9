// @ts-check
/**
 * The player: one Recording (`#token=…&recording=ID`), every Feed in sync on
 * the Session clock.
 *
 * Each Feed is a list of parts (files) placed on the Session clock by their
 * `start` (docs/protocol.md, "Recording"). Times shown are since the
 * recording started (`started_t`, when consent was given): the timeline runs
 * from 0 to the recording's `duration`, the length the library shows, and a
 * step at 0:10 here is at 0:10 in the export and on the contact sheet (the
 * live pages showed it as time since the Session started). One clock drives everything: the
 * main camera's <video> while it is playing a part, else the wall clock (gaps,
 * a Feed without a part at that moment). Every other Feed's <video>/<audio>
 * loads the part covering the clock's time and seeks to `time - part.start`
 * when it drifts. Seeking is instant: parts are served with HTTP Range.
 *
 * Drawings are replayed by the live pages' renderer (telestration.js) from the
 * recorded events, by the same rules as recorder/replay.py: a drawing shows
 * from its `t` until `expires_t` (null: pinned), fading over its last second,
 * until `annotations_cleared`; the current step is the last `mark`'s.
 *
 * Gaps: a Recording whose Session moved between Nodes has spans with no media
 * at all (`gaps` in the Recording, docs/protocol.md, "A recording that moves
 * between Nodes"). Each is hatched on the timeline (its title says how long and
 * why), and while the clock is inside one the picture says so: nothing was
 * recorded then, on any camera.
 *
 * A de-identified export (`#token=…&recording=ID&export=EXPORT`) plays the same
 * way: one part per camera (an MP4 with its sound), no events. A bar above the
 * picture says its state; whoever may review it (docs/protocol.md,
 * "De-identified exports") signs it off or rejects it from here, naming this
 * playback: the server checks that every camera was loaded in it. Once
 * signed off, its files can be downloaded.
 */

import {
  $, Banner, StatePanel, confirmDialog, describeError, el, fromTemplate, pageStateFor, slotTitle,
  withReconnect,
} from './ui.js';
import { FADE_TAIL_MS, contentRect, drawShape } from './telestration.js';
import {
  FINAL_CODES, SCOPE_LABELS, api, formatDuration, formatWhen, pageParams,
} from './review.js';
import { EXPORT_STATE_LABELS, describeOptions, exportPath } from './exports.js';

/** A follower further than this from the clock seeks. */
const DRIFT_S = 0.3;
/** How often the clock, the followers and the drawings are brought up to date. */
const TICK_MS = 50;
/** Refresh the signed URLs (they live at most 5 minutes) this long before they expire. */
const REFRESH_MARGIN_S = 90;
const FADE_TAIL_S = FADE_TAIL_MS / 1000;

/** @typedef {{index: number, file: string, start: number, duration: number, url: string,
 *   width?: number, height?: number}} Part */
/** @typedef {{id: string, kind: string, codec: string, parts: Part[]}} RecordedFeed */
/** @typedef {{t: number, type: string, [key: string]: any}} RecordedEvent */
/** @typedef {{start: number, end: number, reason: string}} Gap */

/** Why a gap has no media, as the player says it (by the manifest's `reason`). */
const GAP_REASONS = /** @type {Record<string, string>} */ ({
  origin_moved: 'the Session moved to another Node' });

// -- gaps ------------------------------------------------------------------------------------

/**
 * The Recording's gaps within [t0, t1], in order. A gap still open (`end`
 * null: the Session is moving now) runs to `t1`.
 * @param {any} raw  the Recording's `gaps`
 * @param {number} t0 @param {number} t1
 * @returns {Gap[]}
 */
export function recordedGaps(raw, t0, t1) {
  if (!Array.isArray(raw)) return [];
  /** @type {Gap[]} */
  const out = [];
  for (const gap of raw) {
    const start = Math.max(t0, Number(gap?.start));
    const end = Math.min(t1, gap?.end === null || gap?.end === undefined ? t1 : Number(gap.end));
    if (Number.isFinite(start) && Number.isFinite(end) && end > start) {
      out.push({ start, end, reason: String(gap.reason || '') });
    }
  }
  return out.sort((a, b) => a.start - b.start);
}

/** @param {Gap[]} list @param {number} t @returns {Gap|null} */
export function gapAt(list, t) {
  return list.find((g) => t >= g.start && t < g.end) || null;
}

/** "Not recorded: 4.1 s (the Session moved to another Node)". @param {Gap} gap */
export function describeGap(gap) {
  const length = gap.end - gap.start;
  const said = length < 60 ? `${length.toFixed(1)} s` : formatDuration(length);
  const why = GAP_REASONS[gap.reason];
  return `Not recorded: ${said}${why ? ` (${why})` : ''}`;
}

// -- replay rules (the same as recorder/replay.py) ------------------------------------

/**
 * Drawings on `feedId` showing at `t`, with their opacity.
 * @param {RecordedEvent[]} events  sorted by t
 * @param {string} feedId @param {number} t
 * @returns {{annotation: any, alpha: number}[]}
 */
export function annotationsAt(events, feedId, t) {
  /** @type {Map<string, any>} */
  const current = new Map();
  for (const event of events) {
    if (event.t > t) break;
    if (event.type === 'annotation' && event.annotation) {
      current.set(String(event.annotation.id), event.annotation);
    } else if (event.type === 'annotations_cleared') {
      for (const [id, a] of current) {
        if (event.feed === null || event.feed === undefined || a.feed === event.feed) current.delete(id);
      }
    }
  }
  const out = [];
  for (const annotation of current.values()) {
    if (annotation.feed !== feedId) continue;
    if (annotation.expires_t === null || annotation.expires_t === undefined) {
      out.push({ annotation, alpha: 1 });
      continue;
    }
    const left = Number(annotation.expires_t) - t;
    if (left > 0) out.push({ annotation, alpha: Math.min(1, left / FADE_TAIL_S) });
  }
  return out;
}

/** @param {RecordedEvent[]} events @param {number} t @returns {string|null} */
export function stepAt(events, t) {
  let step = null;
  for (const event of events) {
    if (event.t > t) break;
    if (event.type === 'mark' && typeof event.current_step === 'string') step = event.current_step;
  }
  return step;
}

// -- one Feed on one media element ------------------------------------------------------

class FeedPlayer {
  /**
   * @param {HTMLMediaElement} media
   * @param {() => {t: number, playing: boolean, rate: number}} want  where the clock is
   * @param {(player: FeedPlayer) => void} onError
   */
  constructor(media, want, onError) {
    this.media = media;
    this.want = want;
    /** @type {RecordedFeed|null} */
    this.feed = null;
    /** @type {Part|null} the part loaded */
    this.part = null;
    this.ready = false;
    media.addEventListener('loadedmetadata', () => {
      this.ready = true;
      this.sync(true);
    });
    media.addEventListener('error', () => {
      if (this.part) onError(this);
    });
  }

  /** @param {RecordedFeed|null} feed */
  setFeed(feed) {
    if (feed && this.feed && feed.id === this.feed.id) {
      this.feed = feed;
      // Renewed URLs: the loaded part's old URL dies within minutes (they live
      // at most 5), so load the new one now; loadedmetadata seeks back to the clock.
      const renewed = this.part && feed.parts.find((p) => p.file === this.part?.file);
      if (renewed && renewed.url !== this.part?.url) {
        this.part = renewed;
        this.ready = false;
        this.media.src = renewed.url;
      }
      return;
    }
    this.feed = feed;
    this.unload();
  }

  unload() {
    this.part = null;
    this.ready = false;
    this.media.pause();
    this.media.removeAttribute('src');
    this.media.load();
  }

  /** @param {number} t @returns {Part|null} */
  partAt(t) {
    if (!this.feed) return null;
    for (const part of this.feed.parts) {
      if (t >= part.start - 0.001 && t < part.start + part.duration) return part;
    }
    return null;
  }

  /** Session time of what the element shows (null: nothing). */
  shownTime() {
    return this.part && this.ready ? this.part.start + this.media.currentTime : null;
  }

  /** Follow the clock; `force`: seek even when close (a user seek). */
  sync(force = false) {
    const { t, playing, rate } = this.want();
    const part = this.partAt(t);
    if (!part) {
      if (this.part) this.unload();
      return;
    }
    if (!this.part || this.part.file !== part.file) {
      this.part = part;
      this.ready = false;
      this.media.playbackRate = rate;
      this.media.src = part.url;
      return; // loadedmetadata syncs again
    }
    this.part = part; // the same file, perhaps a refreshed URL object
    if (!this.ready) return;
    const offset = Math.min(Math.max(0, t - part.start), Math.max(0, part.duration - 0.001));
    if (force || Math.abs(this.media.currentTime - offset) > DRIFT_S * Math.max(1, rate)) {
      this.media.currentTime = offset;
    }
    if (this.media.playbackRate !== rate) this.media.playbackRate = rate;
    if (playing && this.media.paused && !this.media.ended) {
      this.media.play().catch(() => { /* autoplay refused: the next user action plays */ });
    } else if (!playing && !this.media.paused) {
      this.media.pause();
    }
  }
}

// -- the page ----------------------------------------------------------------------------

const banner = new Banner($('#banner'));
const view = $('#player-view');
const mainVideo = /** @type {HTMLVideoElement} */ ($('#player-video'));
const overlay = /** @type {HTMLCanvasElement} */ ($('#player-telestration'));
const stepLabel = $('#player-step');
const feedLabel = $('#player-feed');
const gap = $('#player-gap');
const gapText = $('p', gap);
const playButton = /** @type {HTMLButtonElement} */ ($('#play'));
const timeLabel = $('#player-time');
const speed = /** @type {HTMLSelectElement} */ ($('#player-speed'));
const soundButton = /** @type {HTMLButtonElement} */ ($('#player-sound'));
const timeline = /** @type {HTMLCanvasElement} */ ($('#timeline'));
const timelineGaps = $('#timeline-gaps');

const params = pageParams();
const token = params.token || '';
const recordingId = params.recording || '';
/** A de-identified export of the recording, or '' (the recording itself). */
const exportId = params.export || '';
const detailPath = exportId ? exportPath(recordingId, exportId)
  : `/api/recordings/${encodeURIComponent(recordingId)}`;
if (token) {
  /** @type {HTMLAnchorElement} */ ($('#back-to-library')).href =
    `library.html#${new URLSearchParams({ token }).toString()}`;
}

/** @type {any} */
let recording = null;
/** @type {RecordedEvent[]} */
let events = [];
/** @type {{t: number, kind: string, name: string, id: string}[]} */
let markers = [];
/** @type {{t: number, text: string, author: string, votes: number, status: string, id: string}[]} */
let questions = [];
/** @type {Gap[]} spans with no media, within [t0, t1] */
let gaps = [];
let t0 = 0;
let t1 = 0;
let soundOn = false;
/** The clock: `t` at `wallAt` (performance.now()), advancing at `rate` while playing. */
const clock = { t: 0, wallAt: 0, playing: false, rate: 1 };
/** @type {string} the main Feed */
let mainFeedId = '';
/** @type {Map<string, RecordedFeed>} */
const feeds = new Map();
/** @type {Map<string, FeedPlayer>} followers by Feed id (thumbnails, audio) */
const followers = new Map();
/** @type {Map<string, HTMLElement>} thumbnail buttons by Feed id */
const thumbs = new Map();
let refreshTimer = /** @type {ReturnType<typeof setTimeout>|undefined} */ (undefined);

const want = () => ({ t: now(), playing: clock.playing, rate: clock.rate });
const main = new FeedPlayer(mainVideo, want, (p) => recover(p));

function now() {
  if (!clock.playing) return clock.t;
  return clock.t + ((performance.now() - clock.wallAt) / 1000) * clock.rate;
}

/** @param {number} t */
function setClock(t) {
  clock.t = t;
  clock.wallAt = performance.now();
}

/** @param {number} t */
export function seek(t) {
  setClock(Math.min(Math.max(t, t0), t1));
  syncAll(true);
  render();
}

function play() {
  if (now() >= t1 - 0.05) setClock(t0);
  setClock(now());
  clock.playing = true;
  syncAll(true);
  render();
}

function pause() {
  setClock(now());
  clock.playing = false;
  syncAll(true);
  render();
}

/** @param {boolean} force */
function syncAll(force) {
  main.sync(force);
  for (const player of followers.values()) player.sync(force);
}

/** A media element failed (e.g. its signed URL expired): fresh URLs, reload. */
let recovering = false;
async function recover(/** @type {FeedPlayer} */ player) {
  if (recovering) return;
  recovering = true;
  try {
    await refresh();
    player.unload();
    player.sync(true);
  } catch (err) {
    banner.show(describeError(/** @type {any} */ (err)));
  } finally {
    recovering = false;
  }
}

function tick() {
  if (!recording) return;
  // The main camera leads while it plays a part; otherwise the wall clock.
  const shown = main.shownTime();
  if (clock.playing && shown !== null && !mainVideo.paused && !mainVideo.seeking
      && !mainVideo.ended && mainVideo.readyState >= 3) {
    setClock(shown);
  }
  if (clock.playing && now() >= t1) {
    setClock(t1);
    clock.playing = false;
  }
  syncAll(false);
  render();
}

// -- drawing ------------------------------------------------------------------------------

function render() {
  const t = now();
  const shown = main.shownTime();
  // What is on screen: the playing picture's time, else the clock's (exact after a
  // jump); a millisecond of slack, as events are stamped to the millisecond.
  const at = (clock.playing && shown !== null ? shown : t) + 0.001;
  const notRecorded = gapAt(gaps, t);
  view.dataset.state = main.part && !notRecorded ? 'live' : 'empty';
  // Inside a gap nothing was recorded on any camera: say so rather than leave a
  // picture from before it (or a black one) looking like the moment.
  gap.hidden = (Boolean(main.part) && !notRecorded) || !recording;
  gap.dataset.reason = notRecorded ? notRecorded.reason || 'gap' : '';
  const firstPart = main.feed?.parts[0];
  gapText.textContent = notRecorded ? describeGap(notRecorded)
    : firstPart && t < firstPart.start ? 'No picture from this camera yet.'
      : 'No picture from this camera at this moment.';
  const step = stepAt(events, at);
  stepLabel.hidden = !step;
  stepLabel.textContent = step || '';
  playButton.textContent = clock.playing ? 'Pause' : 'Play';
  playButton.setAttribute('aria-pressed', String(clock.playing));
  timeLabel.textContent = `${formatDuration(t - t0)} / ${formatDuration(t1 - t0)}`;
  drawOverlay(at);
  drawTimeline(t);
  for (const [id, button] of thumbs) button.dataset.state = followers.get(id)?.part ? 'live' : 'down';
}

/** @param {number} at */
function drawOverlay(at) {
  const dpr = window.devicePixelRatio || 1;
  const width = Math.round(overlay.clientWidth * dpr);
  const height = Math.round(overlay.clientHeight * dpr);
  if (overlay.width !== width || overlay.height !== height) {
    overlay.width = width;
    overlay.height = height;
  }
  const ctx = /** @type {CanvasRenderingContext2D} */ (overlay.getContext('2d'));
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const rect = main.part ? contentRect(mainVideo) : null;
  if (!rect) return;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  for (const { annotation, alpha } of annotationsAt(events, mainFeedId, at)) {
    if (annotation.shape) drawShape(ctx, annotation.shape, rect, alpha);
  }
}

const MARK_COLORS = /** @type {Record<string, string>} */ ({
  step: '#33c27f', bookmark: '#5aa2ff', question: '#e8b84a' });

/** @param {number} t */
function drawTimeline(t) {
  const dpr = window.devicePixelRatio || 1;
  const width = Math.round(timeline.clientWidth * dpr);
  const height = Math.round(timeline.clientHeight * dpr);
  if (!width || !height) return;
  if (timeline.width !== width || timeline.height !== height) {
    timeline.width = width;
    timeline.height = height;
  }
  const ctx = /** @type {CanvasRenderingContext2D} */ (timeline.getContext('2d'));
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  const w = timeline.clientWidth;
  const h = timeline.clientHeight;
  ctx.clearRect(0, 0, w, h);
  const x = (/** @type {number} */ time) => ((time - t0) / Math.max(0.001, t1 - t0)) * w;
  ctx.fillStyle = '#1b232c';
  ctx.fillRect(0, h / 2 - 4, w, 8);
  // Where each camera has pictures.
  ctx.fillStyle = '#2a3440';
  for (const feed of feeds.values()) {
    for (const part of feed.parts) ctx.fillRect(x(part.start), h / 2 - 4, x(part.start + part.duration) - x(part.start), 8);
  }
  ctx.fillStyle = '#98a6b5';
  ctx.fillRect(0, h / 2 - 2, x(t), 4);
  for (const marker of [...markers, ...questions.map((q) => ({ ...q, kind: 'question' }))]) {
    ctx.fillStyle = MARK_COLORS[marker.kind] || '#fff';
    const mx = x(marker.t);
    ctx.fillRect(mx - 1.5, marker.kind === 'question' ? h / 2 + 5 : 2, 3, h / 2 - 7);
  }
  ctx.fillStyle = '#e7edf3';
  ctx.beginPath();
  ctx.arc(x(t), h / 2, 6, 0, 2 * Math.PI);
  ctx.fill();
  timeline.setAttribute('aria-valuemax', String(Math.round(t1 - t0)));
  timeline.setAttribute('aria-valuenow', String(Math.round(t - t0)));
  const inGap = gapAt(gaps, t);
  timeline.setAttribute('aria-valuetext', `${formatDuration(t - t0)}${inGap ? ' (not recorded)' : ''}`);
}

/** One hatched span per gap over the timeline, placed in percent (resizing keeps them right). */
function drawGaps() {
  const span = Math.max(0.001, t1 - t0);
  timelineGaps.replaceChildren(...gaps.map((g) => {
    const said = describeGap(g);
    const node = el('div', { class: 'timeline-gap', title: said, 'aria-label': said, role: 'img',
      'data-start': g.start, 'data-end': g.end, 'data-reason': g.reason });
    // CSSOM, not a style attribute: the pages' CSP allows no inline styles.
    node.style.left = `${((g.start - t0) / span) * 100}%`;
    node.style.width = `${((g.end - g.start) / span) * 100}%`;
    return node;
  }));
  $('#legend-gap').hidden = gaps.length === 0;
}

// On the wrapper: a click on a gap's span (over the canvas) jumps too.
$('#timeline-wrap').addEventListener('click', (event) => {
  if (!recording) return;
  const box = timeline.getBoundingClientRect();
  const px = event.clientX - box.left;
  const time = t0 + (px / box.width) * (t1 - t0);
  // Close to a marker: its exact moment.
  const near = [...markers, ...questions].map((m) => ({ m, d: Math.abs(((m.t - t0) / (t1 - t0)) * box.width - px) }))
    .filter(({ d }) => d <= 6).sort((a, b) => a.d - b.d)[0];
  seek(near ? near.m.t : time);
});
timeline.addEventListener('keydown', (event) => {
  if (event.key === 'ArrowLeft' || event.key === 'ArrowRight') {
    event.preventDefault();
    seek(now() + (event.key === 'ArrowLeft' ? -5 : 5));
  }
});
document.addEventListener('keydown', (event) => {
  const target = /** @type {HTMLElement} */ (event.target);
  if (target && ['INPUT', 'SELECT', 'TEXTAREA', 'BUTTON'].includes(target.tagName)) return;
  if (event.key === ' ') {
    event.preventDefault();
    if (clock.playing) pause(); else play();
  } else if (event.key === 'ArrowLeft' || event.key === 'ArrowRight') {
    seek(now() + (event.key === 'ArrowLeft' ? -5 : 5));
  }
});
playButton.addEventListener('click', () => (clock.playing ? pause() : play()));
speed.addEventListener('change', () => {
  setClock(now());
  clock.rate = Number(speed.value) || 1;
  syncAll(true);
});
soundButton.addEventListener('click', () => {
  soundOn = !soundOn;
  soundButton.textContent = soundOn ? 'Sound on' : 'Sound off';
  soundButton.setAttribute('aria-pressed', String(soundOn));
  for (const player of followers.values()) {
    if (player.media instanceof HTMLAudioElement) player.media.muted = !soundOn;
  }
  // An export's sound is in its MP4s: the main camera's plays it.
  if (exportId) mainVideo.muted = !soundOn;
});
mainVideo.addEventListener('seeked', () => render());
window.addEventListener('resize', () => render());

// -- building the page from the Recording ------------------------------------------------

/** @param {string} id */
function switchMain(id) {
  if (id === mainFeedId || !feeds.has(id)) return;
  const previous = mainFeedId;
  const follower = followers.get(id);
  mainFeedId = id;
  main.setFeed(feeds.get(id) || null);
  feedLabel.textContent = slotTitle(id.split('.')[0]);
  // The previous main camera takes the thumbnail of the new one.
  if (follower && previous) {
    followers.delete(id);
    followers.set(previous, follower);
    follower.setFeed(feeds.get(previous) || null);
    const button = thumbs.get(id);
    if (button) {
      thumbs.delete(id);
      thumbs.set(previous, button);
      button.dataset.feed = previous;
      $('.slot-name', button).textContent = slotTitle(previous.split('.')[0]);
    }
  }
  syncAll(true);
  render();
}

function build() {
  const videos = [...feeds.values()].filter((f) => f.kind === 'video' && f.parts.length);
  const audios = [...feeds.values()].filter((f) => f.kind === 'audio' && f.parts.length);
  mainFeedId = videos[0]?.id || '';
  main.setFeed(videos[0] || null);
  feedLabel.textContent = mainFeedId ? slotTitle(mainFeedId.split('.')[0]) : '';
  const list = $('#player-thumbs');
  for (const feed of videos.slice(1)) {
    const button = fromTemplate('player-thumb-template');
    button.dataset.feed = feed.id;
    $('.slot-name', button).textContent = slotTitle(feed.id.split('.')[0]);
    const player = new FeedPlayer(/** @type {HTMLVideoElement} */ ($('video', button)), want,
      (p) => recover(p));
    player.setFeed(feed);
    followers.set(feed.id, player);
    thumbs.set(feed.id, button);
    button.addEventListener('click', () => switchMain(String(button.dataset.feed)));
    list.append(button);
  }
  $('#player-thumbs-empty').hidden = videos.length > 1;
  for (const feed of audios) {
    const audio = /** @type {HTMLAudioElement} */ (el('audio', { preload: 'auto' }));
    audio.muted = !soundOn;
    $('#player-audio').append(audio);
    const player = new FeedPlayer(audio, want, (p) => recover(p));
    player.setFeed(feed);
    followers.set(feed.id, player);
  }

  const markList = $('#mark-list');
  for (const marker of markers) {
    const button = el('button', { class: 'btn small mark-button', type: 'button',
      'data-kind': marker.kind, 'data-t': marker.t, 'data-mark': marker.id },
    el('span', { class: 'mark-time' }, formatDuration(marker.t - t0)),
    el('span', { class: 'mark-kind' }, marker.kind === 'bookmark' ? 'Bookmark' : 'Step'),
    el('span', { class: 'mark-name' }, marker.name));
    button.addEventListener('click', () => seek(marker.t));
    markList.append(el('li', {}, button));
  }
  $('#marks-empty').hidden = markers.length > 0;
  const questionList = $('#player-questions');
  for (const question of questions) {
    const button = el('button', { class: 'btn small mark-button', type: 'button',
      'data-kind': 'question', 'data-t': question.t },
    el('span', { class: 'mark-time' }, formatDuration(question.t - t0)),
    el('span', { class: 'mark-name' }, question.text),
    el('span', { class: 'mark-kind muted' },
      `${question.author}${question.votes ? ` · ${question.votes} vote${question.votes === 1 ? '' : 's'}` : ''}${question.status !== 'open' ? ` · ${question.status}` : ''}`));
    button.addEventListener('click', () => seek(question.t));
    questionList.append(el('li', {}, button));
  }
  $('#player-questions-empty').hidden = questions.length > 0;
  if (exportId) {
    // Left out of the copy, not missing from the recording.
    $('#marks-empty').textContent = 'A de-identified copy has no steps: their titles may name people.';
    $('#player-questions-empty').textContent = 'A de-identified copy has no questions or chat.';
  }
  const consent = recording.consent || {};
  $('#player-consent').textContent = [SCOPE_LABELS[consent.scope] || consent.scope,
    consent.recorded_by ? `recorded by ${consent.recorded_by}` : '',
    consent.recorded_at ? formatWhen(consent.recorded_at) : '', consent.note || '']
    .filter(Boolean).join(' · ');
}

/** @param {any} body */
function useDetail(body) {
  recording = body.recording;
  playback = String(body.playback || '');
  feeds.clear();
  for (const feed of recording.feeds) feeds.set(feed.id, feed);
  main.setFeed(feeds.get(mainFeedId) || main.feed);
  for (const [id, player] of followers) player.setFeed(feeds.get(id) || null);
  if (exportId) showReview(body);
  clearTimeout(refreshTimer);
  const inMs = (Number(body.expires_at) - Date.now() / 1000 - REFRESH_MARGIN_S) * 1000;
  refreshTimer = setTimeout(() => refresh().catch(() => {}), Math.max(10_000, inMs));
}

/** The playback the signed URLs belong to: renewing keeps it (one audit entry per part). */
let playback = '';

async function refresh() {
  const query = playback ? `?${new URLSearchParams({ playback })}` : '';
  useDetail(await api(`${detailPath}${query}`, token));
}

// -- a de-identified export's review ---------------------------------------------------------

const reviewDialog = /** @type {HTMLDialogElement} */ ($('#review-dialog'));
const reviewNote = /** @type {HTMLTextAreaElement} */ ($('#review-note'));
/** @type {any} the export as last described by the server */
let exported = null;
let mayReview = false;

/** @param {any} body */
function showReview(body) {
  exported = body.export;
  mayReview = Boolean(body.may_review);
  const bar = $('#review-bar');
  bar.hidden = false;
  bar.dataset.state = exported.state;
  $('#review-state').textContent = `De-identified copy: ${EXPORT_STATE_LABELS[exported.state] || exported.state}`;
  const review = exported.review;
  $('#review-detail').textContent = [
    describeOptions(exported),
    exported.state === 'pending_review' && mayReview
      ? 'Watch every camera through, with the sound on, before signing off: faces, monitors, names said aloud.' : '',
    exported.state === 'pending_review' && !mayReview ? 'Not shared until it is signed off.' : '',
    review?.by ? `${review.decision === 'rejected' ? 'Rejected' : 'Signed off'} by ${review.by.name} ${formatWhen(review.at)}` : '',
    review?.note ? `“${review.note}”` : '',
    exported.shared ? 'Shared with the reviewers of other sessions.' : '',
  ].filter(Boolean).join(' · ');
  $('#review-sign').hidden = !mayReview;
  $('#review-reject').hidden = !mayReview;
  const downloads = $('#review-downloads');
  downloads.hidden = exported.state !== 'signed_off';
  downloads.replaceChildren(...(exported.state === 'signed_off' ? recording.feeds.flatMap(
    (/** @type {RecordedFeed} */ f) => f.parts.map((part) => el('a', {
      class: 'btn small', href: part.url, download: part.file }, `Download ${slotTitle(f.id.split('.')[0])}`))) : []));
}

/** @param {'sign_off'|'reject'} decision */
async function decide(decision) {
  const reject = decision === 'reject';
  $('#review-dialog-title').textContent = reject ? 'Reject this de-identified copy?'
    : 'Sign off this de-identified copy?';
  $('#review-dialog-text').textContent = reject
    ? 'Say what is still recognisable; an admin can make a new copy with other settings.'
    : 'Nobody can be recognised and nothing names the patient, in every camera and in the sound. Once signed off it may be shared for teaching.';
  $('#review-note-label').textContent = reject ? 'Why (required)' : 'Note (optional)';
  $('#review-ok').textContent = reject ? 'Reject' : 'Sign off';
  reviewNote.value = '';
  reviewNote.required = reject;
  if (!(await confirmDialog(reviewDialog))) return;
  try {
    const body = await api(`${exportPath(recordingId, exportId)}/review`, token, 'POST',
      { decision, playback, note: reviewNote.value.trim() });
    showReview({ export: body.export, may_review: false });
    await refresh();
  } catch (err) {
    banner.show(describeError(/** @type {any} */ (err)));
  }
}
$('#review-sign').addEventListener('click', () => decide('sign_off'));
$('#review-reject').addEventListener('click', () => decide('reject'));
$('#review-cancel').addEventListener('click', () => reviewDialog.close('cancel'));

async function load() {
  if (!token || !recordingId) {
    $('#player-sub').textContent = 'Open a recording from the library (your reviewer link).';
    return;
  }
  let body;
  try {
    body = await withReconnect(() => api(detailPath, token));
  } catch (err) {
    const error = /** @type {any} */ (err);
    $('#player-sub').textContent = 'This recording could not be opened.';
    if (FINAL_CODES.has(error.code)) new StatePanel($('#ended')).show(pageStateFor(error));
    else banner.show(describeError(error), { sticky: true });
    return;
  }
  useDetail(body);
  events = body.events;
  markers = events.filter((e) => e.type === 'mark' && e.mark)
    .map((e) => ({ t: Number(e.mark.t ?? e.t), kind: String(e.mark.kind), name: String(e.mark.name),
      id: String(e.mark.id) }));
  /** @type {Map<string, any>} */
  const latest = new Map();
  for (const e of events) {
    if (e.type === 'question' && e.question) latest.set(String(e.question.id), e.question);
    if (e.type === 'questions' && Array.isArray(e.questions)) {
      for (const q of e.questions) latest.set(String(q.id), q);
    }
  }
  questions = [...latest.values()].map((q) => ({ id: String(q.id), t: Number(q.t) || 0,
    text: String(q.text || ''), author: String(q.author?.name || ''), votes: Number(q.votes) || 0,
    status: String(q.status || 'open') })).sort((a, b) => a.t - b.t);
  // The recording's own span: from consent (started_t) for its duration, as the
  // library says; media outside it (none is kept) would not be reachable.
  const ends = recording.feeds.flatMap((/** @type {RecordedFeed} */ f) => f.parts.map((p) => [p.start, p.start + p.duration]));
  const started = Number(recording.started_t);
  t0 = Number.isFinite(started) && recording.started_t !== null ? started
    : Math.min(...ends.map((/** @type {number[]} */ e) => e[0]), Infinity);
  if (!Number.isFinite(t0)) t0 = 0;
  const duration = Number(recording.duration);
  t1 = recording.duration !== null && Number.isFinite(duration) ? t0 + duration
    : Math.max(t0, ...ends.map((/** @type {number[]} */ e) => e[1]));
  gaps = recordedGaps(recording.gaps, t0, t1);
  drawGaps();
  setClock(t0);
  const name = exportId ? `De-identified: ${recording.title || recording.procedure || 'recording'}`
    : recording.title || 'Recording';
  document.title = `ScrubIn · ${name}`;
  $('#player-title').textContent = name;
  $('#player-sub').textContent = [recording.procedure, recording.expert, formatWhen(recording.started),
    formatDuration(t1 - t0)].filter(Boolean).join(' · ');
  build();
  playButton.disabled = false;
  syncAll(true);
  render();
  setInterval(tick, TICK_MS);
}

window.scrubinPlayer = {
  time: () => now(),
  /** Seconds since the recording started (what the page shows). */
  recordingTime: () => now() - t0,
  range: () => [t0, t1],
  /** The steps and bookmarks as listed: [label shown, Session time]. */
  marks: () => [...document.querySelectorAll('#mark-list .mark-button')].map((b) => [
    `${b.querySelector('.mark-time')?.textContent} ${b.querySelector('.mark-name')?.textContent}`,
    Number(/** @type {HTMLElement} */ (b).dataset.t)]),
  timeLabel: () => timeLabel.textContent,
  seek,
  play,
  pause,
  playing: () => clock.playing,
  mainVideo: () => mainVideo,
  mainFeed: () => mainFeedId,
  mainPart: () => main.part,
  shownTime: () => main.shownTime(),
  switchMain,
  events: () => events,
  /** The gaps drawn on the timeline (Session clock). */
  gaps: () => gaps,
  overlay: () => overlay,
  /** The de-identified export shown (null: a recording) and whether this token may review it. */
  exported: () => exported,
  mayReview: () => mayReview,
  playback: () => playback,
};
load();

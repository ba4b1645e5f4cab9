// @ts-check
/**
 * The expert's page: choose a camera (and microphone) per camera slot of the
 * theatre, go live with several slots at once, see who is watching, end the
 * Session.
 */

import { MIC_SLOT, ScrubinClient, nowMs, toScrubinError } from './protocol.js';
import { DrawingPad, FrameClock, TelestrationOverlay } from './telestration.js';
import {
  Toasts, button, clock, questionItem, renderChat, sortQuestions,
} from './live.js';
import { mountRecording } from './recording.js';
import { forgetToken, takeToken } from './token.js';
import {
  $, Banner, StatePanel, attachStream, confirmDialog, describeError, el, endedState, fromTemplate,
  pageStateFor, showConnection, slotTitle,
} from './ui.js';

/** Slots that carry a microphone rather than a camera, by naming convention. */
const AUDIO_SLOT = /(^|[-_])(narration|audio|mic|voice)([-_]|$)/;

/** What we ask of a camera: HD if it can, theatre cameras usually can. */
const VIDEO_CONSTRAINTS = { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } };

/**
 * @typedef {object} SlotView
 * @property {string} slot
 * @property {HTMLElement} card
 * @property {HTMLVideoElement} video
 * @property {HTMLSelectElement} camera
 * @property {HTMLSelectElement} mic
 * @property {HTMLElement} pill
 * @property {HTMLElement} viewers
 * @property {HTMLButtonElement} stop
 * @property {HTMLButtonElement} draw
 * @property {TelestrationOverlay} overlay  drawings over the preview
 * @property {DrawingPad} pad
 * @property {FrameClock} frames            timing of the frame on screen, sent with drawings
 * @property {boolean} subscribing          subscribing to this slot's Feed published elsewhere
 * @property {HTMLElement} error
 * @property {HTMLElement} owner           who else publishes this slot (an encoder)
 * @property {HTMLButtonElement} takeover   take the slot over from that encoder
 * @property {MediaStream|null} stream   local capture for this slot (preview and publish)
 * @property {number} generation         guards against overlapping device switches
 * @property {boolean} busy              a publish/unpublish of this slot is in flight
 * @property {string} problem            last error for this slot, shown on its card
 */

const banner = new Banner($('#banner'));
const panel = new StatePanel($('#ended'));
const connPill = /** @type {HTMLElement} */ ($('#conn-state'));
const goLiveButton = /** @type {HTMLButtonElement} */ ($('#go-live'));
const stopAllButton = /** @type {HTMLButtonElement} */ ($('#stop-all'));
const endButton = /** @type {HTMLButtonElement} */ ($('#end-session'));
const grid = $('#slot-grid');
const toasts = new Toasts($('#toasts'));
const sterileButton = /** @type {HTMLButtonElement} */ ($('#sterile-toggle'));

/** @type {Map<string, SlotView>} */
const slots = new Map();
/** @type {{cameras: MediaDeviceInfo[], mics: MediaDeviceInfo[]}} */
const devices = { cameras: [], mics: [] };
/** @type {WakeLockSentinel|null} */
let wakeLock = null;

/** The drawing tool and its settings (the toolbar). */
const tool = /** @type {{kind: import('./protocol.js').Shape['kind'], color: string, width: number}} */ (
  { kind: 'freehand', color: '#ff3b30', width: 4 });
/** @type {SlotView|null} the slot being drawn on */
let drawing = null;
/** annotation id → when this page sent it (nowMs), for latency checks */
const sentAt = new Map();
/** Questions already seen, so only new ones are announced. */
const seenQuestions = new Set();
/** @type {HTMLAudioElement|null} the trainee microphone, played here */
let micAudio = null;
let micSubscribing = false;

const token = takeToken();
/** @type {ScrubinClient|null} */
let client = null;

if (!token) {
  showConnection(connPill, 'idle');
  showState({ kind: 'failed', title: 'This page needs your broadcast link',
    text: 'Open the link you were given for this session (it ends with #token=…).' });
} else {
  client = new ScrubinClient({ token });
  start(client);
}

/** @param {ScrubinClient} c */
function start(c) {
  mountRecording(c); // REC indicator; Record button for the expert
  c.addEventListener('state', (e) => {
    const { state } = /** @type {CustomEvent} */ (e).detail;
    if (!panel.kind) showConnection(connPill, state);
    // Revoked (or refused) after joining: the client stops; say why, once.
    if (state === 'failed' && c.fatalError) {
      stopCapture();
      forgetToken();
      showState(pageStateFor(c.fatalError));
    }
    renderAll();
  });
  c.addEventListener('welcome', (e) => {
    const { reconnected } = /** @type {CustomEvent} */ (e).detail;
    if (panel.kind === 'not_started') {
      panel.hide();
      showConnection(connPill, c.state);
    }
    if (!reconnected) setUp(c);
    renderAll();
  });
  c.addEventListener('roster', () => renderRoster(c));
  c.addEventListener('feed', () => renderAll());
  c.addEventListener('subscription', () => renderAll());
  c.addEventListener('interaction', (e) => onInteraction(c, /** @type {CustomEvent} */ (e).detail));
  c.addEventListener('presence', (e) => {
    const { event, participant, role, feed, slot } = /** @type {CustomEvent} */ (e).detail;
    const who = participant.name || participant.role || 'Someone';
    if (event === 'dropped') {
      // Shown even in sterile focus: a camera or a viewer lost is worth knowing.
      toasts.show(role === 'publisher'
        ? `Lost the camera on ${slotTitle(slot || '')} (${who}); waiting for it to come back`
        : `${who}'s connection dropped (${feed || 'video'})`);
      return;
    }
    if (c.interaction.sterile || participant.id === c.participant?.id) return;
    toasts.show(`${who} ${event === 'joined' ? 'joined' : 'left'}`);
  });
  c.addEventListener('slot_taken_over', (e) => {
    const { slot, from, by } = /** @type {CustomEvent} */ (e).detail;
    toasts.show(`${by?.name || 'Someone'} took over ${slotTitle(slot)} from ${from?.name || 'its '
      + 'publisher'}`);
  });
  c.addEventListener('publication', (e) => {
    const pub = /** @type {CustomEvent} */ (e).detail.publication;
    const view = slots.get(pub.slot);
    if (view && pub.error && (pub.state === 'failed' || pub.state === 'stopped')) {
      view.problem = describeError(pub.error);
    }
    renderAll();
  });
  c.addEventListener('error', (e) => {
    const { error, request } = /** @type {CustomEvent} */ (e).detail;
    if (c.state === 'failed' || panel.final) return; // the state panel says it
    if (request === 'hello' && error.code === 'session_not_started') {
      panel.showNotStarted(c.token, () => c.state !== 'open'); // joins when it starts
      return;
    }
    banner.show(describeError(error));
  });
  c.addEventListener('going_away', () => {
    banner.show('The server is restarting; reconnecting automatically…', { level: 'info' });
  });
  c.addEventListener('session_ended', (e) => {
    const { reason } = /** @type {CustomEvent} */ (e).detail;
    stopCapture();
    forgetToken();
    showState(endedState(reason === 'ended' ? '' : reason));
  });
  c.connect().catch((err) => {
    const error = toScrubinError(err);
    if (error.code === 'session_ended' || panel.final) return; // already shown
    stopCapture();
    forgetToken();
    showState(pageStateFor(error));
  });

  goLiveButton.addEventListener('click', () => goLive(c));
  stopAllButton.addEventListener('click', () => stopAll(c));
  endButton.addEventListener('click', () => endSession(c));
  window.addEventListener('beforeunload', (event) => {
    // Closing the tab mid-procedure by accident would cut every trainee off.
    if (c.publications.size > 0 && c.state === 'open') event.preventDefault();
  });
  window.addEventListener('pagehide', () => c.close());
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState !== 'visible') return;
    c.checkConnection();
    if (c.publications.size > 0) holdWakeLock();
  });

  window.scrubin = {
    client: c,
    slots,
    goLive: () => goLive(c),
    stopAll: () => stopAll(c),
    slotState: (/** @type {string} */ slot) => slots.get(slot)?.card.dataset.state,
    draw: (/** @type {string} */ slot) => setDrawing(c, slots.get(slot) || null),
    overlay: (/** @type {string} */ slot) => slots.get(slot)?.overlay,
    interaction: () => c.interaction,
    /** annotation id → when this page sent it (nowMs) */
    sentAt,
    micAudio: () => micAudio,
  };
  setUpInteraction(c);
}

/** First welcome: describe the Session and build one card per slot. */
function setUp(/** @type {ScrubinClient} */ c) {
  const session = /** @type {NonNullable<typeof c.session>} */ (c.session);
  $('#session-title').textContent = session.title || session.id;
  $('#session-sub').textContent = [session.theatre.name, session.procedure]
    .filter(Boolean).join(' · ');
  document.title = `ScrubIn · Broadcast · ${session.title || session.id}`;

  if (c.participant?.role !== 'expert') {
    // The server refuses publishing from any other role; don't offer it.
    const notice = $('#role-notice');
    notice.hidden = false;
    /** @type {HTMLAnchorElement} */ ($('#watch-link')).href =
      `watch.html#token=${encodeURIComponent(c.token)}`;
    if (c.participant?.role === 'admin') {
      // An admin moderates: the queue, hands, microphone, chat, sterile focus.
      $('#role-notice-text').textContent = 'You moderate this session: questions, hands, the '
        + 'microphone, chat and sterile focus. The cameras are the expert\'s.';
      $('#slots').hidden = true;
      for (const node of document.querySelectorAll('.expert-only')) {
        /** @type {HTMLElement} */ (node).hidden = true;
      }
      endButton.hidden = true;
      return;
    }
    $('.broadcast-layout').hidden = true;
    endButton.hidden = true;
    sterileButton.hidden = true;
    return;
  }
  endButton.disabled = false;
  for (const slot of session.theatre.slots) {
    const view = buildSlot(c, slot);
    slots.set(slot, view);
    grid.append(view.card);
  }
  initDevices(c);
}

/** @param {ScrubinClient} c @param {string} slot @returns {SlotView} */
function buildSlot(c, slot) {
  const card = fromTemplate('slot-template');
  card.dataset.slot = slot;
  $('.slot-name', card).textContent = slotTitle(slot);
  /** @type {SlotView} */
  const view = {
    slot,
    card,
    video: /** @type {HTMLVideoElement} */ ($('.preview-video', card)),
    camera: /** @type {HTMLSelectElement} */ ($('.camera-select', card)),
    mic: /** @type {HTMLSelectElement} */ ($('.mic-select', card)),
    pill: $('.slot-state', card),
    viewers: $('.slot-viewers', card),
    stop: /** @type {HTMLButtonElement} */ ($('.slot-stop', card)),
    draw: /** @type {HTMLButtonElement} */ ($('.slot-draw', card)),
    error: $('.slot-error', card),
    owner: $('.slot-owner', card),
    takeover: /** @type {HTMLButtonElement} */ ($('.slot-takeover', card)),
    stream: null,
    generation: 0,
    busy: false,
    problem: '',
    subscribing: false,
    // Filled in just below (they need the video element).
    overlay: /** @type {any} */ (null),
    pad: /** @type {any} */ (null),
    frames: /** @type {any} */ (null),
  };
  const canvas = /** @type {HTMLCanvasElement} */ ($('.telestration', card));
  view.overlay = new TelestrationOverlay(view.video, canvas);
  view.frames = new FrameClock(view.video);
  view.pad = new DrawingPad(view.overlay, {
    tool: () => ({ ...tool, text: /** @type {HTMLInputElement} */ ($('#draw-text')).value }),
    maxPoints: () => c.interaction.limits.points || 500,
    onShape: (shape) => sendShape(c, view, shape),
    onEmptyLabel: () => {
      banner.show('Type the label text first, then click where it goes.', { level: 'info' });
      /** @type {HTMLInputElement} */ ($('#draw-text')).focus();
    },
  });
  view.draw.setAttribute('aria-label', `Draw on ${slotTitle(slot)}`);
  view.draw.addEventListener('click', () => setDrawing(c, drawing === view ? null : view));
  view.camera.setAttribute('aria-label', `Camera for ${slotTitle(slot)}`);
  view.mic.setAttribute('aria-label', `Microphone for ${slotTitle(slot)}`);
  view.camera.addEventListener('change', () => capture(c, view));
  view.takeover.addEventListener('click', () => {
    if (view.stream) publishSlot(c, view, true);
  });
  view.mic.addEventListener('change', () => capture(c, view));
  view.stop.addEventListener('click', () => stopSlot(c, view));
  return view;
}

// -- devices ---------------------------------------------------------------

/** @param {ScrubinClient} c */
async function initDevices(c) {
  const media = navigator.mediaDevices;
  if (!media || !media.getUserMedia) {
    deviceProblem('This browser cannot use cameras here. Open the link over https:// in a recent '
      + 'Chrome, Edge, Firefox or Safari.');
    return;
  }
  // Device names are only visible once the user allowed access: ask once.
  let probe = null;
  for (const constraints of [{ video: true, audio: true }, { video: true }, { audio: true }]) {
    try {
      probe = await media.getUserMedia(constraints);
      break;
    } catch (err) {
      const name = /** @type {Error} */ (err).name;
      if (name === 'NotAllowedError' || name === 'SecurityError') {
        deviceProblem('Camera and microphone access was refused. Allow it in the browser\'s site '
          + 'settings, then reload this page.');
        return;
      }
    }
  }
  await refreshDevices();
  probe?.getTracks().forEach((t) => t.stop());
  if (!devices.cameras.length && !devices.mics.length) {
    deviceProblem('No camera or microphone was found. Connect one and it will appear here.');
  }
  assignDefaults(c);
  await Promise.all([...slots.values()].map((view) => capture(c, view)));
  media.addEventListener('devicechange', () => refreshDevices().then(renderAll));
}

/** @param {string} message */
function deviceProblem(message) {
  const box = $('#device-problem');
  box.textContent = message;
  box.hidden = !message;
}

async function refreshDevices() {
  const list = await navigator.mediaDevices.enumerateDevices();
  devices.cameras = list.filter((d) => d.kind === 'videoinput' && d.deviceId);
  devices.mics = list.filter((d) => d.kind === 'audioinput' && d.deviceId
    && d.deviceId !== 'default' && d.deviceId !== 'communications');
  if (devices.cameras.length || devices.mics.length) deviceProblem('');
  for (const view of slots.values()) {
    fillSelect(view.camera, devices.cameras, 'Camera');
    fillSelect(view.mic, devices.mics, 'Microphone');
  }
}

/**
 * @param {HTMLSelectElement} select
 * @param {MediaDeviceInfo[]} list
 * @param {string} noun
 */
function fillSelect(select, list, noun) {
  const keep = select.value;
  select.replaceChildren(el('option', { value: '' }, 'Off'),
    ...list.map((d, i) => el('option', { value: d.deviceId }, d.label || `${noun} ${i + 1}`)));
  select.value = list.some((d) => d.deviceId === keep) ? keep : '';
}

/**
 * Cameras to camera slots in order; the microphone to the narration slot.
 * Never for a slot an encoder already publishes: two publishers would fight.
 * @param {ScrubinClient} c
 */
function assignDefaults(c) {
  const views = [...slots.values()].filter((v) => !encoderOf(c, v));
  const videoSlots = views.filter((v) => !AUDIO_SLOT.test(v.slot));
  videoSlots.forEach((view, i) => {
    if (devices.cameras[i]) view.camera.value = devices.cameras[i].deviceId;
  });
  const micSlot = views.find((v) => AUDIO_SLOT.test(v.slot)) || videoSlots[0];
  if (micSlot && devices.mics[0]) micSlot.mic.value = devices.mics[0].deviceId;
}

/**
 * (Re)open the devices chosen for a slot. A live slot switches without
 * interrupting viewers; choosing "Off" for both stops publishing it.
 * @param {ScrubinClient} c
 * @param {SlotView} view
 */
async function capture(c, view) {
  const generation = ++view.generation;
  const cameraId = view.camera.value;
  const micId = view.mic.value;
  view.problem = '';
  /** @type {MediaStream|null} */
  let stream = null;
  if (cameraId || micId) {
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        video: cameraId ? { deviceId: { exact: cameraId }, ...VIDEO_CONSTRAINTS } : false,
        audio: micId ? { deviceId: { exact: micId } } : false,
      });
    } catch (err) {
      if (generation !== view.generation) return;
      view.problem = `Cannot open the device: ${/** @type {Error} */ (err).message || err}`;
      renderAll();
      return;
    }
  }
  if (generation !== view.generation) {
    stream?.getTracks().forEach((t) => t.stop());
    return;
  }
  const old = view.stream;
  view.stream = stream;
  for (const track of stream?.getTracks() || []) {
    track.addEventListener('ended', () => {
      if (view.stream !== stream) return;
      view.problem = `The ${track.kind === 'video' ? 'camera' : 'microphone'} stopped `
        + '(unplugged or taken by another application).';
      renderSlot(c, view);
    });
  }
  attachStream(view.video, stream && stream.getVideoTracks().length ? stream : null);
  try {
    if (c.publications.has(view.slot)) {
      if (stream) await c.replaceTracks(view.slot, stream);
      else await c.unpublish(view.slot);
    }
  } catch (err) {
    view.problem = describeError(toScrubinError(err));
  } finally {
    old?.getTracks().forEach((t) => t.stop());
    updateMeters();
    renderAll();
  }
}

// -- microphone level --------------------------------------------------------

/** @type {AudioContext|null} */
let audioContext = null;
/** @type {Map<SlotView, {source: MediaStreamAudioSourceNode, analyser: AnalyserNode,
 *   data: Uint8Array<ArrayBuffer>, stream: MediaStream}>} */
const meters = new Map();
let meterLoop = 0;

/**
 * Show each slot's microphone level, so the expert sees the narration mic
 * works before and while live. Audio can only start after a click or key
 * press on the page; until then the meters stay hidden.
 */
function updateMeters() {
  if (!audioContext) {
    if (!navigator.userActivation?.hasBeenActive) return;
    audioContext = new AudioContext();
  }
  const ctx = audioContext;
  for (const view of slots.values()) {
    const meter = meters.get(view);
    const stream = view.stream && view.stream.getAudioTracks().length ? view.stream : null;
    if (meter && meter.stream !== stream) {
      meter.source.disconnect();
      meters.delete(view);
    }
    if (stream && !meters.has(view)) {
      const source = ctx.createMediaStreamSource(stream);
      const analyser = ctx.createAnalyser();
      analyser.fftSize = 512;
      source.connect(analyser); // not to the speakers: no feedback in theatre
      meters.set(view, { source, analyser, data: new Uint8Array(analyser.fftSize), stream });
    }
    $('.meter', view.card).hidden = !stream;
  }
  if (meters.size && !meterLoop) meterLoop = requestAnimationFrame(drawMeters);
}

function drawMeters() {
  meterLoop = 0;
  for (const [view, meter] of meters) {
    meter.analyser.getByteTimeDomainData(meter.data);
    let peak = 0;
    for (const v of meter.data) peak = Math.max(peak, Math.abs(v - 128));
    const level = Math.min(1, peak / 100);
    // The bar is a cover over the scale: shrink it to show the level.
    /** @type {HTMLElement} */ ($('.meter-bar', view.card)).style.transform =
      `scaleX(${(1 - level).toFixed(3)})`;
  }
  if (meters.size) meterLoop = requestAnimationFrame(drawMeters);
}

for (const type of ['pointerdown', 'keydown']) {
  document.addEventListener(type, () => setTimeout(updateMeters), { once: true, capture: true });
}

/** Stop every camera and microphone (the session ended: lights off). */
function stopCapture() {
  for (const view of slots.values()) {
    view.generation++;
    view.stream?.getTracks().forEach((t) => t.stop());
    view.stream = null;
    view.video.srcObject = null;
  }
  updateMeters();
  audioContext?.close().catch(() => {});
  releaseWakeLock();
}

// -- going live --------------------------------------------------------------

/** Publish every slot that has a device chosen and is not live yet. */
async function goLive(/** @type {ScrubinClient} */ c) {
  const ready = [...slots.values()].filter((v) => v.stream && !c.publications.has(v.slot));
  if (!ready.length) {
    banner.show('Choose a camera or microphone for at least one slot first.', { level: 'info' });
    return;
  }
  goLiveButton.disabled = true;
  holdWakeLock();
  await Promise.allSettled(ready.map((view) => publishSlot(c, view)));
  renderAll();
}

/** @param {ScrubinClient} c @param {SlotView} view @param {boolean} [takeover] */
async function publishSlot(c, view, takeover = false) {
  const stream = /** @type {MediaStream} */ (view.stream);
  view.busy = true;
  view.problem = '';
  renderSlot(c, view);
  try {
    await c.publish(view.slot, stream, { takeover });
  } catch (err) {
    view.problem = describeError(toScrubinError(err));
  } finally {
    view.busy = false;
    renderSlot(c, view);
  }
}

/** @param {ScrubinClient} c @param {SlotView} view */
async function stopSlot(c, view) {
  view.busy = true;
  renderSlot(c, view);
  try {
    await c.unpublish(view.slot);
  } catch (err) {
    view.problem = describeError(toScrubinError(err));
  } finally {
    view.busy = false;
    if (c.publications.size === 0) releaseWakeLock();
    renderAll();
  }
}

async function stopAll(/** @type {ScrubinClient} */ c) {
  await Promise.allSettled([...slots.values()]
    .filter((v) => c.publications.has(v.slot))
    .map((v) => stopSlot(c, v)));
}

async function endSession(/** @type {ScrubinClient} */ c) {
  const dialog = /** @type {HTMLDialogElement} */ ($('#end-dialog'));
  if (!(await confirmDialog(dialog))) return;
  endButton.disabled = true;
  try {
    await c.endSession();
  } catch (err) {
    endButton.disabled = false;
    banner.show(describeError(toScrubinError(err)));
  }
}

{
  const dialog = /** @type {HTMLDialogElement} */ ($('#end-dialog'));
  $('#end-cancel').addEventListener('click', () => dialog.close('cancel'));
  $('#end-confirm').addEventListener('click', () => dialog.close('confirm'));
}

function holdWakeLock() {
  // Keep the theatre laptop from sleeping while it broadcasts.
  if (wakeLock || !('wakeLock' in navigator) || document.visibilityState !== 'visible') return;
  navigator.wakeLock.request('screen').then((lock) => {
    wakeLock = lock;
    lock.addEventListener('release', () => { wakeLock = null; });
  }, () => { /* not granted (battery saver, headless): fine */ });
}

function releaseWakeLock() {
  wakeLock?.release().catch(() => {});
  wakeLock = null;
}

// -- rendering ---------------------------------------------------------------

/** @type {Record<string, string>} */
const PUBLICATION_LABELS = {
  connecting: 'Connecting…',
  live: 'Live',
  reconnecting: 'Reconnecting…',
  failed: 'Failed',
  stopped: 'Stopped',
};

function renderAll() {
  if (!client) return;
  $('#conn-strip').hidden = !(client.state === 'reconnecting' && !panel.kind);
  syncPreviews(client);
  syncMic(client);
  for (const view of slots.values()) renderSlot(client, view);
  const order = [...slots.keys()];
  const live = [...client.publications.values()]
    .sort((a, b) => order.indexOf(a.slot) - order.indexOf(b.slot));
  const ready = [...slots.values()].filter((v) => v.stream && !client?.publications.has(v.slot));
  const open = client.state === 'open';
  goLiveButton.disabled = !open || ready.length === 0
    || ready.every((v) => v.busy);
  // Once some slots are live, say which ones the button would add.
  goLiveButton.textContent = live.length && ready.length
    ? `Go live: ${ready.map((v) => slotTitle(v.slot)).join(', ')}` : 'Go live';
  stopAllButton.disabled = !open || live.length === 0;
  endButton.disabled = !open || client.participant?.role !== 'expert';
  const summary = $('#live-summary');
  if (live.length) {
    const names = live.map((p) => slotTitle(p.slot)).join(', ');
    summary.textContent = `Broadcasting: ${names}.`;
  } else {
    summary.textContent = 'Choose a camera or microphone for each slot you want to broadcast, '
      + 'then Go live.';
  }
}

/** @param {ScrubinClient} c @param {SlotView} view */
function renderSlot(c, view) {
  const pub = c.publications.get(view.slot);
  /** @type {string} */
  let state;
  let label;
  const remote = remoteFeed(c, view);
  const stalled = [...c.feeds.values()].some((f) => f.slot === view.slot && f.kind === 'video'
    && f.state === 'stalled');
  if (panel.final) {
    state = 'off';
    label = 'Off';
  } else if (pub && pub.state === 'live' && stalled) {
    // Connected, but the server gets no pictures: the camera stopped or froze.
    state = 'reconnecting';
    label = 'Camera stalled';
  } else if (pub) {
    state = pub.state;
    label = PUBLICATION_LABELS[pub.state] || pub.state;
  } else if (remote && remote.state === 'stalled') {
    state = 'reconnecting';
    label = 'Encoder stalled';
  } else if (remote) {
    // Published by an encoder outside this page (WHIP): shown, and drawable.
    state = remote.state === 'live' ? 'remote' : 'reconnecting';
    label = remote.state === 'live' ? 'Live (encoder)' : 'Waiting for encoder';
  } else if (view.busy) {
    state = 'connecting';
    label = 'Connecting…';
  } else if (view.stream) {
    state = 'preview';
    label = 'Not live';
  } else {
    state = 'off';
    label = 'Off';
  }
  view.card.dataset.state = state;
  view.pill.dataset.state = state;
  view.pill.textContent = label;
  const hasVideo = Boolean(view.stream && view.stream.getVideoTracks().length);
  view.card.classList.toggle('audio-only', Boolean(view.stream) && !hasVideo);
  $('.preview-empty span', view.card).textContent = view.stream && !hasVideo
    ? 'Microphone only' : 'Off';

  const feeds = [...c.feeds.values()].filter((f) => f.slot === view.slot);
  const watching = feeds.reduce((n, f) => Math.max(n, f.viewers || 0), 0);
  // Edges (other Nodes relaying this camera to their own viewers): counted apart.
  const edges = feeds.reduce((n, f) => Math.max(n, f.relays || 0), 0);
  view.viewers.textContent = pub
    ? `${watching} ${watching === 1 ? 'viewer' : 'viewers'}${
      edges ? ` + ${edges} ${edges === 1 ? 'edge' : 'edges'}` : ''} · ${
      feeds.map((f) => f.kind).sort().reverse().join(' + ') || '…'}`
    : '';
  view.stop.hidden = !pub || panel.final;
  view.stop.disabled = view.busy;
  view.camera.disabled = panel.final;
  view.mic.disabled = panel.final;
  const drawable = c.feeds.has(`${view.slot}.video`) && c.participant?.role === 'expert'
    && !panel.final;
  view.draw.hidden = !drawable;
  view.draw.setAttribute('aria-pressed', String(drawing === view));
  view.draw.textContent = drawing === view ? 'Drawing…' : 'Draw';
  if (!drawable && drawing === view) setDrawing(c, null);
  view.error.textContent = view.problem;
  view.error.hidden = !view.problem;
  const other = encoderOf(c, view);
  view.owner.hidden = !other;
  view.owner.textContent = other ? `Published by ${other.name || 'an encoder'}`
    + `${other.via === 'whip' ? ' (encoder)' : ' (another device)'}.` : '';
  // Offer to take over only with a device chosen, and never over a slot in flight.
  view.takeover.hidden = !other || !view.stream || view.busy;
  view.takeover.textContent = other?.via === 'whip' ? 'Take over from the encoder'
    : 'Take over on this device';
}

/** @param {ScrubinClient} c */
function renderRoster(c) {
  $('#viewer-count').textContent = String(c.viewers);
  const list = $('#roster');
  const people = [...c.participants].sort((a, b) =>
    (a.role === 'expert' ? 0 : 1) - (b.role === 'expert' ? 0 : 1)
    || a.name.localeCompare(b.name));
  const mic = c.interaction.mic;
  list.replaceChildren(...people.map((p) => el('li', { class: 'roster-item', 'data-role': p.role,
    'data-participant': p.id },
  el('span', { class: 'roster-name' }, p.name || p.role,
    p.id === c.participant?.id ? el('span', { class: 'muted' }, ' (you)') : null),
  p.role === 'trainee' && mic?.id !== p.id && !c.interaction.sterile
    ? button('Give mic', () => act(c.grantMic(p.id)), { class: 'btn small give-mic',
      'aria-label': `Give the microphone to ${p.name || 'this trainee'}` })
    : null,
  mic?.id === p.id ? el('span', { class: 'pill', 'data-state': 'live' }, 'mic') : null,
  el('span', { class: 'badge', 'data-role': p.role }, p.role))));
  $('#roster-empty').hidden = people.some((p) => p.id !== c.participant?.id);
}

/**
 * Revoked, ended or cannot join: the page-wide panel, and nothing behind it
 * left looking busy or clickable (cards say Off, controls are disabled).
 * @param {import('./ui.js').PageState} state
 */
function showState(state) {
  panel.show(state);
  if (drawing && client) setDrawing(client, null);
  for (const view of slots.values()) view.busy = false;
  renderAll();
  goLiveButton.disabled = true;
  stopAllButton.disabled = true;
  endButton.disabled = true;
  sterileButton.disabled = true;
  $('#conn-strip').hidden = true;
}

// -- live interaction ----------------------------------------------------------

/** Report a failed request in the banner. @param {Promise<unknown>} promise */
function act(promise) {
  promise.catch((err) => {
    if (!panel.final) banner.show(describeError(toScrubinError(err)));
  });
}

/** @param {ScrubinClient} c @param {SlotView|null} view */
function setDrawing(c, view) {
  if (drawing && drawing !== view) {
    drawing.pad.enable(false);
    drawing.frames.stop();
    drawing.card.classList.remove('drawing');
  }
  drawing = view;
  const toolbar = $('#draw-toolbar');
  toolbar.hidden = !view;
  if (view) {
    view.card.classList.add('drawing');
    view.pad.enable(true);
    view.frames.start();
    $('#draw-target').textContent = `Drawing on ${slotTitle(view.slot)}`;
    toolbar.scrollIntoView({ block: 'start' });
    // The picture just grew: redraw at the new size.
    requestAnimationFrame(() => view.overlay.render());
  }
  for (const v of slots.values()) {
    v.draw.setAttribute('aria-pressed', String(v === drawing));
    v.draw.textContent = v === drawing ? 'Drawing…' : 'Draw';
  }
  return Boolean(view);
}

/** @param {ScrubinClient} c @param {SlotView} view @param {import('./protocol.js').Shape} shape */
function sendShape(c, view, shape) {
  const media = view.frames.media();
  const started = nowMs();
  const pinned = /** @type {HTMLInputElement} */ ($('#draw-pin')).checked;
  const fadeS = Number(/** @type {HTMLSelectElement} */ ($('#draw-fade')).value) || undefined;
  c.annotate(`${view.slot}.video`, shape, { pinned, fadeS, media })
    .then((annotation) => sentAt.set(annotation.id, started))
    .catch((err) => banner.show(describeError(toScrubinError(err))));
}

/**
 * Who else publishes this slot (an encoder over WHIP, or the expert's other
 * device), if anyone. @param {ScrubinClient} c @param {SlotView} view
 */
function encoderOf(c, view) {
  if (c.publications.has(view.slot)) return null;
  const feed = [...c.feeds.values()].find((f) => f.slot === view.slot && f.publisher);
  const publisher = feed?.publisher;
  return publisher && publisher.id !== c.participant?.id ? publisher : null;
}

/** A video Feed of this slot published by someone else (an encoder), if any. */
function remoteFeed(/** @type {ScrubinClient} */ c, /** @type {SlotView} */ view) {
  if (c.publications.has(view.slot) || view.stream) return null;
  return c.feeds.get(`${view.slot}.video`) || null;
}

/**
 * Each preview shows the local camera, or else the slot's Feed from an
 * external encoder (subscribed), so the expert can draw on every Feed.
 * @param {ScrubinClient} c
 */
function syncPreviews(c) {
  for (const view of slots.values()) {
    const id = `${view.slot}.video`;
    const remote = remoteFeed(c, view);
    const sub = c.subscriptions.get(id);
    if (remote && !sub && !view.subscribing && c.state === 'open') {
      view.subscribing = true;
      c.subscribe(id).catch(() => {}).finally(() => {
        view.subscribing = false;
        renderAll();
      });
    } else if (!remote && sub) {
      c.unsubscribe(id).catch(() => {});
    }
    const local = view.stream && view.stream.getVideoTracks().length ? view.stream : null;
    const stream = remote && sub ? sub.stream : local;
    if (view.video.srcObject !== stream) attachStream(view.video, stream);
  }
}

/** Play the trainee microphone when a trainee has it. @param {ScrubinClient} c */
function syncMic(c) {
  const id = `${MIC_SLOT}.audio`;
  if (c.feeds.has(id) && !c.subscriptions.has(id) && !micSubscribing && c.state === 'open') {
    micSubscribing = true;
    c.subscribe(id).catch(() => {}).finally(() => {
      micSubscribing = false;
      renderAll();
    });
  }
  const sub = c.subscriptions.get(id);
  if (sub) {
    if (!micAudio) {
      micAudio = /** @type {HTMLAudioElement} */ (el('audio', { autoplay: true, 'data-feed': id }));
      $('#mic-sinks').append(micAudio);
    }
    if (micAudio.srcObject !== sub.stream) {
      micAudio.srcObject = sub.stream;
      micAudio.play().catch(() => {});
    }
  } else if (micAudio) {
    micAudio.srcObject = null;
    micAudio.remove();
    micAudio = null;
  }
}

/** @param {ScrubinClient} c @param {{type: string, message: any}} detail */
function onInteraction(c, { type, message }) {
  const live = c.interaction;
  if (type === 'interaction_state') {
    for (const id of live.questions.keys()) seenQuestions.add(id);
  } else if (type === 'question' && !seenQuestions.has(message.question.id)) {
    seenQuestions.add(message.question.id);
    if (!live.sterile) toasts.show(`Question from ${message.question.author.name}`);
  } else if (type === 'hand' && message.raised && !live.sterile) {
    toasts.show(`${message.participant.name} raised a hand`, { level: 'warn' });
  } else if (type === 'sterile') {
    toasts.show(message.on ? 'Sterile focus on: trainees are silenced.'
      : 'Sterile focus off.', { level: 'warn' });
  }
  renderInteraction(c);
}

/** @param {ScrubinClient} c */
function setUpInteraction(c) {
  for (const b of document.querySelectorAll('#draw-toolbar [data-tool]')) {
    b.addEventListener('click', () => {
      tool.kind = /** @type {any} */ (/** @type {HTMLElement} */ (b).dataset.tool);
      for (const o of document.querySelectorAll('#draw-toolbar [data-tool]')) {
        o.setAttribute('aria-pressed', String(o === b));
      }
      if (tool.kind === 'label') /** @type {HTMLInputElement} */ ($('#draw-text')).focus();
    });
  }
  for (const b of document.querySelectorAll('#draw-toolbar [data-color]')) {
    b.addEventListener('click', () => {
      tool.color = /** @type {HTMLElement} */ (b).dataset.color || tool.color;
      for (const o of document.querySelectorAll('#draw-toolbar [data-color]')) {
        o.setAttribute('aria-pressed', String(o === b));
      }
    });
  }
  $('#draw-clear').addEventListener('click', () => {
    if (drawing) act(c.clearAnnotations(`${drawing.slot}.video`));
  });
  $('#draw-done').addEventListener('click', () => setDrawing(c, null));
  sterileButton.addEventListener('click', () => act(c.setSterile(!c.interaction.sterile)));
  $('#mic-take-back').addEventListener('click', () => act(c.revokeMic()));

  const stepInput = /** @type {HTMLInputElement} */ ($('#step-input'));
  $('#step-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const name = stepInput.value.trim();
    if (!name) return;
    act(c.mark(name, 'step').then(() => { stepInput.value = ''; }));
  });
  $('#bookmark').addEventListener('click', () => bookmark(c));

  const chatInput = /** @type {HTMLInputElement} */ ($('#chat-input'));
  $('#chat-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const text = chatInput.value.trim();
    if (!text) return;
    act(c.chat(text).then(() => { chatInput.value = ''; }));
  });

  document.addEventListener('keydown', (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey || c.participant?.role !== 'expert') return;
    const target = /** @type {HTMLElement} */ (event.target);
    if (target.closest('input, select, textarea, dialog')) return;
    const key = event.key.toLowerCase();
    if (key === 'n') {
      const { steps, currentStep } = c.interaction;
      const next = steps[currentStep === null ? 0 : steps.indexOf(currentStep) + 1];
      if (next) act(c.mark(next, 'step'));
    } else if (key === 'b') {
      bookmark(c);
    } else if (key === 'd') {
      const first = [...slots.values()].find((v) => !v.draw.hidden);
      setDrawing(c, drawing ? null : first || null);
    } else if (key === 'escape' && drawing) {
      setDrawing(c, null);
    } else {
      return;
    }
    event.preventDefault();
  });
}

/** A bookmark named by the step box, or numbered. @param {ScrubinClient} c */
function bookmark(c) {
  const input = /** @type {HTMLInputElement} */ ($('#step-input'));
  const count = c.interaction.marks.filter((m) => m.kind === 'bookmark').length;
  const name = input.value.trim() || `Bookmark ${count + 1}`;
  act(c.mark(name, 'bookmark').then(() => {
    input.value = '';
    toasts.show(`Bookmarked “${name}” at ${clock(c.interaction.sessionTime())}`);
  }));
}

/** @param {ScrubinClient} c */
function renderInteraction(c) {
  const live = c.interaction;
  for (const view of slots.values()) view.overlay.show(`${view.slot}.video`, live.annotations.values());

  // Steps: one click marks one.
  const current = $('#current-step');
  const lastStep = [...live.marks].reverse().find((m) => m.kind === 'step');
  current.dataset.empty = String(!live.currentStep);
  current.textContent = live.currentStep
    ? `Now: ${live.currentStep}${lastStep ? ` (since ${clock(lastStep.t)})` : ''}`
    : 'No step marked yet.';
  const expert = c.participant?.role === 'expert';
  $('#step-list').replaceChildren(...live.steps.map((name) => el('li', {},
    expert ? button(name, () => act(c.mark(name, 'step')), {
      class: 'btn small step', 'data-current': String(name === live.currentStep),
      'aria-pressed': String(name === live.currentStep),
    }) : el('span', { class: 'btn small step', 'data-current': String(name === live.currentStep) },
      name))));

  // Questions: the queue, open ones first by votes.
  const questions = sortQuestions([...live.questions.values()]);
  $('#question-count').textContent = String(questions.filter((q) => q.status === 'open').length);
  $('#questions-empty').hidden = questions.length > 0;
  $('#question-queue').replaceChildren(...questions.map((q) => questionItem(q,
    ...(q.status === 'open'
      ? [button('Answered', () => act(c.setQuestionStatus(q.id, 'answered')), { class: 'btn small answer' }),
        button('Dismiss', () => act(c.setQuestionStatus(q.id, 'dismissed')), { class: 'btn small ghost dismiss' })]
      : [button('Reopen', () => act(c.setQuestionStatus(q.id, 'open')), { class: 'btn small ghost reopen' })]))));

  // Hands and the microphone.
  const mic = live.mic;
  $('#mic-status').textContent = mic ? `${mic.name} has the microphone.`
    : 'Nobody has the microphone.';
  $('#mic-take-back').hidden = !mic;
  const hands = [...live.hands.values()].sort((a, b) => a.t - b.t);
  $('#hands-empty').hidden = hands.length > 0;
  $('#hand-list').replaceChildren(...hands.map((h) => el('li', { class: 'hand-item', 'data-participant': h.participant.id },
    el('span', { class: 'hand-name' }, `✋ ${h.participant.name}`),
    live.sterile ? null : button('Give mic', () => act(c.grantMic(h.participant.id)), { class: 'btn small give-mic' }),
    button('Lower', () => act(c.lowerHand(h.participant.id)), { class: 'btn small ghost' }))));

  renderChat($('#chat-log'), live.chat, c.participant?.id);

  sterileButton.disabled = c.state !== 'open';
  sterileButton.setAttribute('aria-pressed', String(live.sterile));
  sterileButton.textContent = live.sterile ? 'Sterile focus: ON' : 'Sterile focus';
  $('#sterile-strip').hidden = !live.sterile || c.state !== 'open';
  document.body.dataset.sterile = String(live.sterile);
  renderRoster(c);
}

// @ts-check
/**
 * The trainee's page: one main camera, thumbnails of the other live cameras
 * (click to switch), the Session's microphones through audio elements.
 *
 * Every Feed of the Session is subscribed, so switching cameras is instant.
 * A Feed that goes `down` (the expert's camera or network dropped) keeps its
 * Subscription: the server resumes it when the publisher returns, so this page
 * only shows "waiting for camera" and never resubscribes for it.
 */

import { MIC_SLOT, ScrubinClient, toScrubinError } from './protocol.js';
import { TelestrationOverlay } from './telestration.js';
import { Toasts, button, clock, questionItem, renderChat, sortQuestions } from './live.js';
import { mountRecording } from './recording.js';
import { forgetToken, takeToken, tokenClaims } from './token.js';
import {
  $, Banner, StatePanel, attachStream, describeError, el, endedState, fromTemplate, pageStateFor,
  showConnection, slotTitle,
} from './ui.js';

/** @typedef {import('./protocol.js').Feed} Feed */
/** @typedef {import('./protocol.js').Subscription} Subscription */

/** Subscription errors that only mean the Feed went away meanwhile. */
const QUIET_ERRORS = new Set(['unknown_feed', 'feed_closed', 'cancelled']);

const banner = new Banner($('#banner'));
const panel = new StatePanel($('#ended'));
const connPill = /** @type {HTMLElement} */ ($('#conn-state'));
const mainView = $('#main-view');
const mainVideo = /** @type {HTMLVideoElement} */ ($('#main-video'));
const overlay = $('#main-overlay');
const overlayText = $('#main-overlay-text');
const audioToggle = /** @type {HTMLButtonElement} */ ($('#audio-toggle'));
const enableAudioButton = /** @type {HTMLButtonElement} */ ($('#enable-audio'));
const thumbList = $('#thumb-list');
const audioSinks = $('#audio-sinks');
const toasts = new Toasts($('#toasts'));
const handButton = /** @type {HTMLButtonElement} */ ($('#hand-toggle'));
const telestration = new TelestrationOverlay(mainVideo,
  /** @type {HTMLCanvasElement} */ ($('#main-telestration')));
/** @type {MediaStreamTrack|null} this trainee's microphone, while it has it */
let micTrack = null;
/** Starting the microphone (getUserMedia, publish) is under way. */
let micStarting = false;

/** @type {string|null} Feed shown in the main view */
let mainFeedId = null;
/** The trainee picked the main camera: keep it while it exists. */
let mainChosen = false;
/** The main video has shown at least one frame of its current stream. */
let mainHasFrames = false;
/** The trainee wants sound (the toggle). */
let audioWanted = true;
/** The browser refused to start sound without a click. */
let audioBlocked = false;
/** @type {'auto'|'full'|'low'} what the trainee chose for the main view */
let pinnedQuality = 'auto';
/** Bytes the main view had received at the last look, and when. */
let lastBytes = { id: '', bytes: 0, at: 0 };
/** @type {Map<string, {button: HTMLButtonElement, video: HTMLVideoElement}>} */
const thumbs = new Map();
/** @type {Map<string, HTMLAudioElement>} */
const audioElements = new Map();
/** Feeds being subscribed, and when a failed one may be tried again. */
const subscribing = new Set();
/** @type {Map<string, number>} */
const retryAfter = new Map();
/** @type {ReturnType<typeof setTimeout>|undefined} */
let retryTimer;

const token = takeToken();
/** @type {ScrubinClient|null} */
let client = null;

if (!token) {
  showConnection(connPill, 'idle');
  showState({ kind: 'failed', title: 'This page needs your watch link',
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
      forgetToken();
      showState(pageStateFor(c.fatalError));
    }
    render(c);
    renderLive(c);
  });
  c.addEventListener('welcome', (e) => {
    const { reconnected } = /** @type {CustomEvent} */ (e).detail;
    if (panel.kind === 'not_started') { // it started: join as promised
      panel.hide();
      showConnection(connPill, c.state);
    }
    if (!reconnected) describeSession(c);
    syncSubscriptions(c);
    render(c);
  });
  c.addEventListener('feed', () => {
    syncSubscriptions(c);
    render(c);
  });
  c.addEventListener('interaction', (e) => onInteraction(c, /** @type {CustomEvent} */ (e).detail));
  c.addEventListener('publication', (e) => {
    const pub = /** @type {CustomEvent} */ (e).detail.publication;
    if (pub.slot === MIC_SLOT && (pub.state === 'stopped' || pub.state === 'failed')) stopMic();
  });
  c.addEventListener('subscription', (e) => {
    const { subscription, streamChanged } = /** @type {CustomEvent} */ (e).detail;
    if (streamChanged && subscription.feedId === mainFeedId) mainHasFrames = false;
    if (subscription.state === 'closed' || subscription.state === 'failed') {
      // Closed with its Feed, or refused: try again if the Feed is still there.
      scheduleRetry(c, subscription.feedId);
    }
    render(c);
  });
  c.addEventListener('error', (e) => {
    const { error, request } = /** @type {CustomEvent} */ (e).detail;
    if (c.state === 'failed' || panel.final) return; // the state panel says it
    if (request === 'hello' && error.code === 'session_not_started') {
      // The client keeps trying and joins when it starts.
      panel.showNotStarted(c.token, () => c.state !== 'open');
      return;
    }
    if (request === 'subscribe' && QUIET_ERRORS.has(error.code)) return;
    banner.show(describeError(error));
  });
  c.addEventListener('going_away', () => {
    banner.show('The server is restarting; reconnecting automatically…', { level: 'info' });
  });
  c.addEventListener('session_ended', (e) => {
    const { reason } = /** @type {CustomEvent} */ (e).detail;
    forgetToken();
    showState(endedState(reason === 'ended' ? '' : reason));
    if (token) watchForCertificate(token);
  });
  c.connect().catch((err) => {
    const error = toScrubinError(err);
    if (error.code === 'session_ended' || panel.final) return; // already shown
    forgetToken();
    showState(pageStateFor(error));
  });

  for (const type of ['loadeddata', 'playing', 'resize']) {
    mainVideo.addEventListener(type, () => {
      if (mainVideo.videoWidth > 0 && !mainHasFrames) {
        mainHasFrames = true;
        render(c);
      }
    });
  }
  audioToggle.addEventListener('click', () => {
    audioWanted = !(audioWanted && !audioBlocked);
    audioBlocked = false;
    applyAudio(true);
    render(c);
  });
  enableAudioButton.addEventListener('click', () => {
    audioWanted = true;
    audioBlocked = false;
    applyAudio(true);
    render(c);
  });
  window.addEventListener('pagehide', () => c.close());
  document.addEventListener('visibilitychange', () => {
    // A tablet waking up: its socket may have died while it slept.
    if (document.visibilityState === 'visible') c.checkConnection();
    render(c);
  });
  const quality = /** @type {HTMLSelectElement} */ ($('#quality'));
  quality.addEventListener('change', () => {
    pinnedQuality = /** @type {'auto'|'full'|'low'} */ (quality.value);
    render(c);
  });
  setInterval(() => showQuality(c), 2000);

  // Full screen for the main view (with its overlays), where the browser allows it.
  const fullscreenButton = /** @type {HTMLButtonElement} */ ($('#fullscreen'));
  fullscreenButton.hidden = !document.fullscreenEnabled;
  fullscreenButton.addEventListener('click', () => {
    if (document.fullscreenElement) document.exitFullscreen().catch(() => {});
    else mainView.requestFullscreen().catch(() => {});
  });
  document.addEventListener('fullscreenchange', () => {
    fullscreenButton.textContent = document.fullscreenElement ? 'Exit full screen' : 'Full screen';
  });
  // Keys 1–9 pick a camera in the theatre's slot order.
  document.addEventListener('keydown', (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey || !/^[1-9]$/.test(event.key)) return;
    const target = /** @type {HTMLElement} */ (event.target);
    if (target.closest('input, select, textarea')) return;
    const feed = videoFeeds(c)[Number(event.key) - 1];
    if (feed) selectFeed(c, feed.id);
  });

  window.scrubin = {
    client: c,
    mainVideo: () => mainVideo,
    mainFeedId: () => mainFeedId,
    selectFeed: (/** @type {string} */ id) => selectFeed(c, id),
    thumbnails: () => [...thumbs].filter(([, t]) => !t.button.hidden).map(([id]) => id),
    audioElements: () => [...audioElements.values()],
    overlayText: () => (overlay.hidden ? '' : overlayText.textContent),
    audio: () => ({ wanted: audioWanted, blocked: audioBlocked }),
    telestration,
    /** when an annotation was first drawn on this page (nowMs), by id */
    drawnAt: (/** @type {string} */ id) => telestration.drawnAt.get(id) ?? null,
    interaction: () => c.interaction,
    micTrack: () => micTrack,
  };
  setUpInteraction(c);
}

/** @param {ScrubinClient} c */
function describeSession(c) {
  const session = /** @type {NonNullable<typeof c.session>} */ (c.session);
  $('#session-title').textContent = session.title || session.id;
  const who = c.participant?.name ? `Watching as ${c.participant.name}` : '';
  $('#session-sub').textContent = [session.theatre.name, session.procedure, who]
    .filter(Boolean).join(' · ');
  document.title = `ScrubIn · ${session.title || session.id}`;
}

// -- subscriptions -----------------------------------------------------------

/** Subscribe every Feed of the Session that is not subscribed yet. */
function syncSubscriptions(/** @type {ScrubinClient} */ c) {
  if (c.state !== 'open') return;
  const now = Date.now();
  for (const feed of c.feeds.values()) {
    if (c.subscriptions.has(feed.id) || subscribing.has(feed.id)) continue;
    if (feed.slot === MIC_SLOT && c.publications.has(MIC_SLOT)) continue; // our own voice
    if ((retryAfter.get(feed.id) || 0) > now) continue;
    subscribing.add(feed.id);
    c.subscribe(feed.id)
      .then(() => retryAfter.delete(feed.id))
      .catch((err) => {
        const error = toScrubinError(err);
        if (!QUIET_ERRORS.has(error.code)) scheduleRetry(c, feed.id);
      })
      .finally(() => {
        subscribing.delete(feed.id);
        render(c);
      });
  }
}

/** @param {ScrubinClient} c @param {string} id */
function scheduleRetry(c, id) {
  if (!c.feeds.has(id) || c.state === 'ended') return;
  retryAfter.set(id, Date.now() + 3000);
  clearTimeout(retryTimer);
  retryTimer = setTimeout(() => syncSubscriptions(c), 3100);
}

/** @param {ScrubinClient} c @param {string} id */
function selectFeed(c, id) {
  if (!c.feeds.has(id)) return false;
  mainFeedId = id;
  mainChosen = true;
  render(c);
  return true;
}

/** Video Feeds in the theatre's slot order, live ones first among equals. */
function videoFeeds(/** @type {ScrubinClient} */ c) {
  const order = c.session?.theatre.slots || [];
  const rank = (/** @type {Feed} */ f) => {
    const i = order.indexOf(f.slot);
    return i < 0 ? order.length : i;
  };
  return [...c.feeds.values()].filter((f) => f.kind === 'video')
    .sort((a, b) => rank(a) - rank(b) || a.id.localeCompare(b.id));
}

/** Keep the chosen main Feed while it exists; otherwise the first live camera. */
function pickMain(/** @type {ScrubinClient} */ c) {
  const feeds = videoFeeds(c);
  if (mainFeedId && feeds.some((f) => f.id === mainFeedId)) return;
  if (mainFeedId) mainChosen = false;
  mainFeedId = (feeds.find((f) => f.state === 'live') || feeds[0])?.id || null;
}

// -- rendering ---------------------------------------------------------------

/** @param {ScrubinClient} c */
function render(c) {
  if (c.state === 'ended' || panel.kind) return;
  pickMain(c);
  applyLayers(c);
  renderMain(c);
  renderThumbs(c);
  renderAudio(c);
}

/**
 * The main view's connection details: which layer arrives and at what rate.
 * @param {ScrubinClient} c
 */
async function showQuality(c) {
  const note = $('#main-quality');
  const sub = mainFeedId ? c.subscriptions.get(mainFeedId) : undefined;
  if (!sub || !sub.pc || sub.state !== 'connected') {
    note.textContent = '';
    return;
  }
  let bytes = 0;
  let height = 0;
  try {
    (await sub.pc.getStats()).forEach((/** @type {any} */ r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'video') {
        bytes += r.bytesReceived || 0;
        height = r.frameHeight || height;
      }
    });
  } catch {
    return; // closed meanwhile
  }
  const now = performance.now();
  const kbps = lastBytes.id === sub.id && now > lastBytes.at
    ? ((bytes - lastBytes.bytes) * 8) / (now - lastBytes.at) : null;
  lastBytes = { id: sub.id || '', bytes, at: now };
  const layer = sub.layer === 'low'
    ? (sub.wantLayer === 'low' ? 'Low quality' : 'Low quality (weak connection)')
    : 'High quality';
  note.dataset.layer = sub.layer;
  note.textContent = [layer, height ? `${height}p` : '',
    kbps === null ? '' : `${kbps >= 1000 ? (kbps / 1000).toFixed(1) + ' Mbit/s'
      : Math.round(kbps) + ' kbit/s'}`].filter(Boolean).join(' · ');
}

/**
 * Thumbnails cost little: they get a camera's low layer, the main view the
 * best the link carries (or what the trainee pinned); while the page is
 * hidden, thumbnails are paused and the main view drops to the low layer.
 * @param {ScrubinClient} c
 */
function applyLayers(c) {
  const hidden = document.visibilityState === 'hidden';
  for (const feed of videoFeeds(c)) {
    const main = feed.id === mainFeedId;
    c.setLayer(feed.id, main ? (hidden ? 'low' : pinnedQuality) : 'low');
    c.setPaused(feed.id, hidden && !main);
  }
}

/** @param {ScrubinClient} c */
function renderMain(c) {
  const feed = mainFeedId ? c.feeds.get(mainFeedId) : undefined;
  const sub = mainFeedId ? c.subscriptions.get(mainFeedId) : undefined;
  const stream = sub ? sub.stream : null;
  if (mainVideo.srcObject !== stream) {
    mainHasFrames = false;
    attachStream(mainVideo, stream);
  }
  $('#main-name').textContent = feed ? slotTitle(feed.slot) : '';
  telestration.show(mainFeedId, c.interaction.annotations.values());
  const pill = $('#main-state');

  /** @type {[string, string]} state, message ('' hides the overlay) */
  let status;
  if (c.state === 'connecting' || c.state === 'idle') {
    status = ['connecting', 'Connecting to the theatre…'];
  } else if (c.state === 'reconnecting') {
    status = ['reconnecting', 'Connection lost. Reconnecting…'];
  } else if (c.state !== 'open') {
    status = ['failed', 'Disconnected.'];
  } else if (!feed) {
    status = ['empty', 'No camera is live yet. The picture appears as soon as the surgeon goes live.'];
  } else if (feed.state === 'down') {
    status = ['down', 'Waiting for camera… The picture resumes automatically.'];
  } else if (feed.state === 'stalled') {
    status = ['stalled', 'The camera stopped sending pictures. It resumes automatically.'];
  } else if (!sub || sub.state === 'connecting') {
    status = ['connecting', 'Connecting to the camera…'];
  } else if (sub.state === 'reconnecting' || sub.state === 'failed') {
    status = ['reconnecting', 'Reconnecting to the camera…'];
  } else if (!mainHasFrames) {
    status = ['starting', 'Starting video…'];
  } else {
    status = ['live', ''];
  }
  mainView.dataset.state = status[0];
  overlay.hidden = !status[1];
  overlayText.textContent = status[1];
  pill.dataset.state = status[0];
  pill.textContent = feed ? FEED_LABELS[status[0]] || '' : '';
  pill.hidden = !feed;
}

/** @type {Record<string, string>} */
const FEED_LABELS = {
  live: 'Live',
  down: 'Waiting',
  stalled: 'Stalled',
  connecting: 'Connecting…',
  starting: 'Starting…',
  reconnecting: 'Reconnecting…',
  failed: 'Offline',
};

/** @param {ScrubinClient} c @param {Feed} feed */
function feedStatus(c, feed) {
  const sub = c.subscriptions.get(feed.id);
  if (feed.state === 'down' || feed.state === 'stalled') return feed.state;
  if (!sub || sub.state === 'connecting') return 'connecting';
  if (sub.state !== 'connected') return 'reconnecting';
  return 'live';
}

/**
 * One thumbnail per video Feed, the main one hidden: switching cameras only
 * hides and shows elements that are already playing.
 * @param {ScrubinClient} c
 */
function renderThumbs(c) {
  const feeds = videoFeeds(c);
  for (const [id, thumb] of thumbs) {
    if (!feeds.some((f) => f.id === id)) {
      thumb.video.srcObject = null;
      thumb.button.remove();
      thumbs.delete(id);
    }
  }
  feeds.forEach((feed, index) => {
    let thumb = thumbs.get(feed.id);
    if (!thumb) {
      const button = /** @type {HTMLButtonElement} */ (fromTemplate('thumb-template'));
      button.dataset.feed = feed.id;
      button.setAttribute('aria-label', `Show ${slotTitle(feed.slot)} in the main view`);
      $('.slot-name', button).textContent = slotTitle(feed.slot);
      button.addEventListener('click', () => selectFeed(c, feed.id));
      thumb = { button, video: /** @type {HTMLVideoElement} */ ($('.thumb-video', button)) };
      thumbs.set(feed.id, thumb);
    }
    if (thumbList.children[index] !== thumb.button) {
      thumbList.insertBefore(thumb.button, thumbList.children[index] || null);
    }
    const sub = c.subscriptions.get(feed.id);
    const stream = sub ? sub.stream : null;
    if (thumb.video.srcObject !== stream) attachStream(thumb.video, stream);
    thumb.button.hidden = feed.id === mainFeedId;
    thumb.button.title = index < 9 ? `${slotTitle(feed.slot)} (key ${index + 1})` : slotTitle(feed.slot);
    const status = feedStatus(c, feed);
    thumb.button.dataset.state = status;
    const pill = $('.thumb-state', thumb.button);
    pill.dataset.state = status;
    pill.textContent = FEED_LABELS[status] || '';
  });
  $('#thumbs-empty').hidden = feeds.some((f) => f.id !== mainFeedId);
}

/** @param {ScrubinClient} c */
function renderAudio(c) {
  const feeds = [...c.feeds.values()].filter((f) => f.kind === 'audio'
    && !(f.slot === MIC_SLOT && c.publications.has(MIC_SLOT)));
  for (const [id, audio] of audioElements) {
    const sub = c.subscriptions.get(id);
    if (!sub || !feeds.some((f) => f.id === id)) {
      audio.srcObject = null;
      audio.remove();
      audioElements.delete(id);
    }
  }
  for (const feed of feeds) {
    const sub = c.subscriptions.get(feed.id);
    if (!sub) continue;
    let audio = audioElements.get(feed.id);
    if (!audio) {
      audio = /** @type {HTMLAudioElement} */ (el('audio', { autoplay: true, 'data-feed': feed.id }));
      audioElements.set(feed.id, audio);
      audioSinks.append(audio);
    }
    if (audio.srcObject !== sub.stream) {
      audio.srcObject = sub.stream;
      playAudio(c, audio);
    }
  }
  $('#audio-list').replaceChildren(...feeds.map((feed) => {
    const status = feedStatus(c, feed);
    return el('li', { class: 'audio-item', 'data-state': status },
      el('span', { class: 'slot-name' }, slotTitle(feed.slot)),
      el('span', { class: 'pill', 'data-state': status }, FEED_LABELS[status] || ''));
  }));
  $('#audio-empty').hidden = feeds.length > 0;

  const hasAudio = feeds.length > 0;
  const on = audioWanted && !audioBlocked;
  audioToggle.disabled = !hasAudio;
  audioToggle.setAttribute('aria-pressed', String(on));
  audioToggle.textContent = !hasAudio ? 'No sound' : on ? 'Sound on' : 'Sound off';
  audioToggle.dataset.on = String(hasAudio && on);
  enableAudioButton.hidden = !(hasAudio && audioWanted && audioBlocked);
}

/**
 * Start an audio element with sound if the trainee wants it. Browsers refuse
 * sound before the first click on a page: then play muted and offer "Enable
 * audio".
 * @param {ScrubinClient} c
 * @param {HTMLAudioElement} audio
 */
function playAudio(c, audio) {
  audio.muted = !audioWanted || audioBlocked;
  audio.play().catch((/** @type {Error} */ err) => {
    if (err.name !== 'NotAllowedError' || audio.muted) return;
    audioBlocked = true;
    audio.muted = true;
    audio.play().catch(() => {});
    render(c);
  });
}

/** Apply the sound choice to every audio element (from a click: allowed). */
function applyAudio(/** @type {boolean} */ fromGesture) {
  for (const audio of audioElements.values()) {
    audio.muted = !audioWanted || audioBlocked;
    if (fromGesture && audio.paused) audio.play().catch(() => {});
  }
}

/**
 * After the Session: the expert or an admin confirms attendance, and a trainee
 * who qualified gets a certificate; look for it now and then (while this
 * page's token lasts) and offer it for download.
 * @param {string} own
 */
function watchForCertificate(own) {
  const sid = String(tokenClaims(own).sid || '');
  const headers = { Authorization: `Bearer ${own}` };
  let tries = 0;
  const look = async () => {
    tries += 1;
    try {
      const response = await fetch(`/api/sessions/${encodeURIComponent(sid)}/certificate`,
        { headers, cache: 'no-store', credentials: 'omit' });
      if (response.ok) {
        const { certificate } = await response.json();
        if (certificate) {
          showCertificate(own, certificate.pdf, certificate.verify);
          return;
        }
      } else {
        return; // expired or revoked: nothing more to find
      }
    } catch {
      /* offline for a moment: look again */
    }
    if (tries < 240) setTimeout(look, 15_000);
  };
  look();
}

/**
 * @param {string} own @param {string} path
 * @param {string} verify  the certificate's public page (its PDF too, no token needed)
 */
function showCertificate(own, path, verify) {
  $('#certificate-note').hidden = false;
  /** @type {HTMLAnchorElement} */ ($('#certificate-keep')).href = verify;
  $('#certificate-link').onclick = async () => {
    const response = await fetch(path, {
      headers: { Authorization: `Bearer ${own}` }, cache: 'no-store', credentials: 'omit',
    });
    if (!response.ok) return;
    const url = URL.createObjectURL(await response.blob());
    const link = el('a', { href: url, download: 'certificate-of-attendance.pdf' });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  };
}

/**
 * Revoked, ended or cannot join: the page-wide panel, and nothing behind it
 * left looking busy or clickable.
 * @param {import('./ui.js').PageState} state
 */
function showState(state) {
  panel.show(state);
  for (const media of document.querySelectorAll('video, audio')) {
    /** @type {HTMLMediaElement} */ (media).srcObject = null;
  }
  // Nothing is live any more: leave no stale "connecting" badges behind.
  thumbs.clear();
  audioElements.clear();
  thumbList.replaceChildren();
  audioSinks.replaceChildren();
  $('#audio-list').replaceChildren();
  $('#main-name').textContent = '';
  $('#main-state').hidden = true;
  $('#fullscreen').hidden = true;
  overlay.hidden = true;
  mainView.dataset.state = state.kind;
  audioToggle.disabled = true;
  enableAudioButton.hidden = true;
  handButton.disabled = true;
  $('#mic-strip').hidden = true;
  $('#conn-strip').hidden = true;
  stopMic();
}

// -- live interaction ----------------------------------------------------------

/** Report a failed request in the banner (not behind a state panel). @param {Promise<unknown>} promise */
function act(promise) {
  promise.catch((err) => {
    if (!panel.final) banner.show(describeError(toScrubinError(err)));
  });
}

/** @param {ScrubinClient} c */
function setUpInteraction(c) {
  const askInput = /** @type {HTMLInputElement} */ ($('#ask-input'));
  $('#ask-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const text = askInput.value.trim();
    if (!text) return;
    act(c.ask(text).then(() => { askInput.value = ''; }));
  });
  const chatInput = /** @type {HTMLInputElement} */ ($('#chat-input'));
  $('#chat-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const text = chatInput.value.trim();
    if (!text) return;
    act(c.chat(text).then(() => { chatInput.value = ''; }));
  });
  handButton.addEventListener('click', () => {
    const raised = c.participant ? c.interaction.hands.has(c.participant.id) : false;
    act(c.raiseHand(!raised).then((now) => {
      const id = c.participant?.id;
      if (!id) return;
      if (now) c.interaction.hands.set(id, { participant: { id, name: c.participant?.name || '' }, t: 0 });
      else c.interaction.hands.delete(id);
      renderLive(c);
    }));
  });
  $('#mic-give-back').addEventListener('click', () => act(c.revokeMic()));
}

/** @param {ScrubinClient} c @param {{type: string, message: any}} detail */
function onInteraction(c, { type, message }) {
  const me = c.participant?.id;
  if (type === 'question' && message.question.author.id === me && message.question.status !== 'open') {
    toasts.show(`Your question was ${message.question.status}.`);
  } else if (type === 'sterile') {
    toasts.show(message.on ? 'Sterile focus: the surgeon needs quiet.' : 'Sterile focus is over.',
      { level: 'warn' });
  } else if (type === 'mark' && message.mark.kind === 'step') {
    toasts.show(`Step: ${message.mark.name}`);
  }
  syncMic(c);
  renderLive(c);
  if (type === 'annotation' || type === 'annotations_cleared' || type === 'interaction_state') {
    telestration.show(mainFeedId, c.interaction.annotations.values());
  }
}

/**
 * The microphone follows the grant: given, this page publishes it (audio
 * only); taken back, the server closes its Feed and this page stops it.
 * @param {ScrubinClient} c
 */
function syncMic(c) {
  const mine = Boolean(c.participant && c.interaction.mic?.id === c.participant.id);
  if (mine && !micTrack && !micStarting) {
    micStarting = true;
    toasts.show('The surgeon gave you the microphone.', { level: 'warn' });
    navigator.mediaDevices.getUserMedia({ audio: true, video: false })
      .then(async (stream) => {
        const track = stream.getAudioTracks()[0];
        if (!c.interaction.mic || c.interaction.mic.id !== c.participant?.id) {
          track.stop();
          return;
        }
        micTrack = track;
        await c.publishMic(track);
      })
      .catch((err) => {
        stopMic();
        // Ended or cut off meanwhile: the state panel or strip says so already.
        if (c.state !== 'open' || panel.kind) return;
        banner.show(`Cannot use your microphone: ${describeError(toScrubinError(err))}`);
      })
      .finally(() => {
        micStarting = false;
        renderLive(c);
      });
  } else if (!mine && micTrack) {
    stopMic();
    c.unpublish(MIC_SLOT).catch(() => {});
  }
}

function stopMic() {
  micTrack?.stop();
  micTrack = null;
}

/** @param {ScrubinClient} c */
function renderLive(c) {
  const live = c.interaction;
  const me = c.participant?.id;
  const open = c.state === 'open';
  // Lost and coming back (not the first connection, not a final state).
  $('#conn-strip').hidden = !(c.state === 'reconnecting' && !panel.kind);

  // Steps: the list, the current one highlighted and on the picture.
  const done = new Set(live.marks.filter((m) => m.kind === 'step').map((m) => m.name));
  $('#step-list').replaceChildren(...live.steps.map((name) => el('li', {
    class: 'step', 'data-current': String(name === live.currentStep), 'data-done': String(done.has(name)),
  }, name)));
  $('#steps-empty').hidden = Boolean(live.currentStep);
  const stepNow = $('#step-now');
  const lastStep = [...live.marks].reverse().find((m) => m.kind === 'step');
  stepNow.hidden = !live.currentStep;
  stepNow.textContent = live.currentStep
    ? `${live.currentStep}${lastStep ? ` · ${clock(lastStep.t)}` : ''}` : '';

  // Questions: everyone's, with upvotes for others'.
  const questions = sortQuestions([...live.questions.values()].filter((q) => q.status !== 'dismissed'
    || q.author.id === me));
  $('#question-count').textContent = String(questions.filter((q) => q.status === 'open').length);
  $('#questions-empty').hidden = questions.length > 0;
  $('#question-list').replaceChildren(...questions.map((q) => {
    if (q.author.id === me || q.status !== 'open' || c.participant?.role !== 'trainee') {
      return questionItem(q);
    }
    const voted = live.voted.has(q.id);
    return questionItem(q, button(voted ? 'Voted' : 'Upvote', () => act(c.vote(q.id, !voted)), {
      class: 'btn small vote', 'aria-pressed': String(voted),
      'aria-label': `${voted ? 'Remove your vote for' : 'Upvote'} this question`,
    }));
  }));
  $('#ask-note').hidden = !live.sterile;
  for (const control of document.querySelectorAll('#ask-form input, #ask-form button')) {
    /** @type {HTMLInputElement|HTMLButtonElement} */ (control).disabled = !open;
  }
  $('#chat-form button').toggleAttribute('disabled', live.sterile || !open);

  renderChat($('#chat-log'), live.chat, me);
  const chatInput = /** @type {HTMLInputElement} */ ($('#chat-input'));
  chatInput.disabled = live.sterile || !open;
  chatInput.placeholder = live.sterile ? 'Chat is paused (sterile focus)' : 'Message everyone…';

  // Asking, voting and raising a hand are for trainees (an admin watches and reads).
  const trainee = c.participant?.role === 'trainee';
  $('#ask-form').hidden = !trainee;
  handButton.hidden = !trainee;
  const raised = Boolean(me && live.hands.has(me));
  handButton.disabled = !open || (live.sterile && !raised);
  handButton.setAttribute('aria-pressed', String(raised));
  handButton.textContent = raised ? 'Lower hand' : 'Raise hand';

  // While not connected the microphone is not live either: no strip claims so.
  const mine = Boolean(me && live.mic?.id === me) && open;
  $('#mic-strip').hidden = !mine;
  $('#mic-strip-text').textContent = micTrack
    ? 'Your microphone is live: everyone hears you.' : 'Starting your microphone…';
  $('#sterile-strip').hidden = !live.sterile || !open;
  document.body.dataset.sterile = String(live.sterile);
}

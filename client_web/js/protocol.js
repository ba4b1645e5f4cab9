// @ts-check
/**
 * ScrubIn signalling client: the websocket protocol of docs/protocol.md.
 *
 * No DOM here: this module only speaks the protocol and manages peer
 * connections, so the broadcast and watch pages (and tests) share it.
 *
 * One RTCPeerConnection per published slot and one per subscribed Feed, as the
 * protocol requires. Offers are sent complete (ICE gathering finished): the
 * server does not trickle.
 *
 * Recovery, so an expert or trainee on hospital Wi-Fi does not have to reload:
 * - the websocket reconnects with backoff; after the new `welcome` every
 *   Subscription is negotiated again (the server closes a socket's
 *   Subscriptions with it) and every publication whose Feeds are not `live`
 *   is published again (the server keeps the Feeds `down` for a grace period,
 *   so viewers resume without doing anything);
 * - a peer connection that fails (or stays disconnected) is negotiated again;
 * - a Feed going `down` is *not* a reason to resubscribe: the server keeps the
 *   Subscription across publisher reconnects.
 *
 * Events (all `CustomEvent`, payload in `detail`):
 * - `state`        {state, previous, reason}           connection state changed
 * - `welcome`      {welcome, reconnected}               joined (again)
 * - `feed`         {feed}                               a Feed appeared/changed/closed
 * - `roster`       {participants, viewers}
 * - `session_ended` {reason}
 * - `going_away`   {reason}
 * - `error`        {error, request}                     any error from the server or a failed recovery
 * - `publication`  {publication}                        a publication's state changed
 * - `subscription` {subscription}                       a Subscription's state or stream changed
 * - `interaction`  {type, message}                      live interaction changed (`type` is the
 *                                                       server message type, or `interaction_state`
 *                                                       after a (re)join); read `client.interaction`
 * - `slot_taken_over` {slot, from, by}                  (experts and admins) a slot changed publisher
 * - `presence`     {event: 'joined'|'left'|'dropped', participant, role?, reason?, feed?, slot?}
 *                                                       (experts and admins only; `dropped`: a
 *                                                       peer connection went quiet or failed)
 */

/**
 * @typedef {{code: string, message: string, fault: 'user'|'protocol'|'server', status: number}} ErrorObject
 * @typedef {'audio'|'video'} MediaKind
 * @typedef {{id: string, slot: string, kind: MediaKind, codec: string,
 *            state: 'live'|'stalled'|'down'|'closed', viewers: number, relays?: number,
 *            publisher?: {id: string, name: string, via: 'page'|'whip'}|null}} Feed
 * @typedef {{id: string, role: string, name: string}} Participant
 * @typedef {{id: string, name: string, slots: string[]}} Theatre
 * @typedef {{id: string, title: string, procedure: string, state: string,
 *            theatre: Theatre, feeds: Feed[]}} Session
 * @typedef {{type: 'welcome', participant: Participant, session: Session,
 *            participants: Participant[], viewers: number, ice_servers: RTCIceServer[],
 *            node?: {id: string, url: string}, serving?: {id: string, url: string|null},
 *            nodes?: {id: string, url: string}[]}} Welcome
 * @typedef {'idle'|'connecting'|'open'|'reconnecting'|'ended'|'failed'|'closed'} ClientState
 * @typedef {'connecting'|'live'|'reconnecting'|'failed'|'stopped'} PublicationState
 * @typedef {'connecting'|'connected'|'reconnecting'|'failed'|'closed'} SubscriptionState
 * @typedef {{id: string, name: string}} Person
 * @typedef {{kind: 'freehand'|'arrow'|'circle'|'label', color: string, width: number,
 *            points: [number, number][], text?: string}} Shape
 * @typedef {{id: string, feed: string, shape: Shape, pinned: boolean, fade_s: number, t: number,
 *            expires_t: number|null, by: Person, media: Record<string, number>}} Annotation
 * @typedef {{annotation: Annotation, expiresAt: number|null, receivedAt: number}} LiveAnnotation
 * @typedef {{id: string, text: string, author: Person, t: number, votes: number,
 *            status: 'open'|'answered'|'dismissed', held: boolean}} Question
 * @typedef {{id: string, kind: 'step'|'bookmark', name: string, t: number, by: Person}} Mark
 * @typedef {{id: string, text: string, by: Person & {role: string}, t: number}} ChatMessage
 * @typedef {{participant: Person, t: number}} Hand
 */

/** The slot a trainee given the microphone publishes into (audio only). */
export const MIC_SLOT = 'trainee-mic';

/** Server messages that change the live interaction state. */
const INTERACTION_MESSAGES = new Set([
  'annotation', 'annotations_cleared', 'mark', 'question', 'questions', 'chat', 'hand', 'mic',
  'sterile',
]);

/** Wall-clock milliseconds with sub-millisecond precision (same clock in every tab). */
export function nowMs() {
  return performance.timeOrigin + performance.now();
}

/**
 * The live interaction of the Session as this participant sees it: drawings,
 * steps, questions, chat, hands, microphone, sterile focus. Plain data, kept
 * up to date by the client from the server's messages.
 */
export class InteractionState {
  constructor() {
    this.synced = false;
    /** Session clock anchor: `t` seconds at local time `at` (ms, nowMs()). */
    this.clock = { t: 0, at: nowMs() };
    this.startedAt = 0;
    this.procedure = '';
    /** @type {string[]} */
    this.steps = [];
    /** @type {string|null} */
    this.currentStep = null;
    /** @type {Mark[]} */
    this.marks = [];
    /** @type {Map<string, LiveAnnotation>} */
    this.annotations = new Map();
    /** @type {Map<string, Question>} */
    this.questions = new Map();
    /** @type {Set<string>} questions this participant voted for */
    this.voted = new Set();
    /** @type {ChatMessage[]} */
    this.chat = [];
    /** @type {Map<string, Hand>} raised hands (experts see all; trainees their own) */
    this.hands = new Map();
    /** @type {Person|null} */
    this.mic = null;
    this.sterile = false;
    /** @type {Record<string, number>} */
    this.limits = { text_chars: 500, step_chars: 120, points: 500, fade_default_s: 8,
      fade_min_s: 1, fade_max_s: 600 };
  }

  /** The Session clock now: seconds since the Session started. */
  sessionTime() {
    return this.clock.t + (nowMs() - this.clock.at) / 1000;
  }

  /**
   * @param {Annotation} annotation
   * @param {number} t  the server clock when the message was sent
   */
  putAnnotation(annotation, t) {
    const receivedAt = nowMs();
    const expiresAt = annotation.expires_t === null || annotation.expires_t === undefined
      ? null : receivedAt + (annotation.expires_t - t) * 1000;
    this.annotations.set(annotation.id, { annotation, expiresAt, receivedAt });
    this.pruneAnnotations();
  }

  pruneAnnotations() {
    const now = nowMs();
    for (const [id, live] of this.annotations) {
      if (live.expiresAt !== null && live.expiresAt < now) this.annotations.delete(id);
    }
  }

  /** @param {any} state an `interaction_state` message */
  reset(state) {
    this.synced = true;
    this.clock = { t: Number(state.t) || 0, at: nowMs() };
    this.startedAt = Number(state.started_at) || 0;
    this.procedure = String(state.procedure || '');
    this.steps = Array.isArray(state.steps) ? state.steps : [];
    this.currentStep = state.current_step ?? null;
    this.marks = Array.isArray(state.marks) ? state.marks : [];
    this.annotations = new Map();
    for (const a of state.annotations || []) this.putAnnotation(a, this.clock.t);
    this.questions = new Map((state.questions || []).map((/** @type {Question} */ q) => [q.id, q]));
    this.voted = new Set(state.voted || []);
    this.chat = Array.isArray(state.chat) ? state.chat : [];
    this.hands = new Map((state.hands || []).map((/** @type {Hand} */ h) => [h.participant.id, h]));
    this.mic = state.mic || null;
    this.sterile = Boolean(state.sterile);
    if (state.limits) this.limits = { ...this.limits, ...state.limits };
  }

  /** @param {any} msg one of INTERACTION_MESSAGES */
  apply(msg) {
    switch (msg.type) {
      case 'annotation':
        this.putAnnotation(msg.annotation, Number(msg.t) || 0);
        break;
      case 'annotations_cleared':
        for (const [id, live] of this.annotations) {
          if (!msg.feed || live.annotation.feed === msg.feed) this.annotations.delete(id);
        }
        break;
      case 'mark':
        this.marks.push(msg.mark);
        if (this.marks.length > 1000) this.marks.shift();
        if (Array.isArray(msg.steps)) this.steps = msg.steps;
        this.currentStep = msg.current_step ?? null;
        break;
      case 'question':
        this.questions.set(msg.question.id, msg.question);
        break;
      case 'questions':
        this.questions = new Map((msg.questions || []).map((/** @type {Question} */ q) => [q.id, q]));
        break;
      case 'chat':
        if (!this.chat.some((m) => m.id === msg.message.id)) this.chat.push(msg.message);
        if (this.chat.length > 200) this.chat.shift();
        break;
      case 'hand':
        if (msg.raised) this.hands.set(msg.participant.id, { participant: msg.participant, t: msg.t });
        else this.hands.delete(msg.participant.id);
        break;
      case 'mic':
        this.mic = msg.holder || null;
        break;
      case 'sterile':
        this.sterile = Boolean(msg.on);
        break;
      default:
        break;
    }
  }
}

/** An error the server (or this client) reports in the protocol's error shape. */
export class ScrubinError extends Error {
  /** @param {ErrorObject} error */
  constructor(error) {
    super(error.message || error.code);
    this.name = 'ScrubinError';
    /** @type {string} */
    this.code = error.code;
    /** @type {'user'|'protocol'|'server'} */
    this.fault = error.fault;
    /** @type {number} */
    this.status = error.status;
  }

  /** @returns {ErrorObject} */
  toJSON() {
    return { code: this.code, message: this.message, fault: this.fault, status: this.status };
  }
}

/**
 * @param {string} code
 * @param {string} message
 * @param {'user'|'protocol'|'server'} [fault]
 * @param {number} [status]
 */
function clientError(code, message, fault = 'server', status = 0) {
  return new ScrubinError({ code, message, fault, status });
}

/** Close codes after which reconnecting cannot help (docs/protocol.md). */
const FATAL_CLOSE = new Map([
  [4400, 'protocol_error'],
  [4401, 'token_invalid'],
  [4403, 'not_allowed'],
  [4409, 'too_many_connections'],
  [1009, 'too_large'],
]);

/** Hello failures that a retry will not fix. */
const FATAL_HELLO_CODES = new Set([
  'token_missing', 'token_invalid', 'token_expired', 'token_revoked', 'wrong_session',
  'wrong_role', 'unknown_session', 'too_many_connections', 'invite_used_up',
]);

/** Errors the server sends on its own (then it closes the socket) that end this client. */
const FATAL_LATER_CODES = new Set(['token_revoked', 'token_expired', 'token_invalid']);

/** Subscribe failures meaning the Feed is gone: stop trying. */
const FEED_GONE_CODES = new Set(['unknown_feed', 'feed_closed']);

/** The low layer's bitrate ceiling (the server holds publishers to it too). */
const LOW_LAYER_BPS = 250_000;

/**
 * The camera for the low layer: a clone at 15 fps. Not `maxFramerate` on the
 * encoding: libwebrtc then lowers the camera itself, full layer included, to
 * the smallest frame rate any of its encoders asked for.
 * @param {MediaStreamTrack} video
 * @returns {Promise<MediaStreamTrack>}
 */
async function lowLayerTrack(video) {
  const low = video.clone();
  try {
    await low.applyConstraints({ frameRate: { max: 15 } });
  } catch {
    // A browser that cannot: the low layer keeps the camera's rate, still small.
  }
  return low;
}

/** How long a peer connection may stay `disconnected` before it is replaced. */
const DISCONNECTED_GRACE_MS = 5000;
const SUBSCRIPTION_DISCONNECTED_GRACE_MS = 3000;

/**
 * A video Subscription whose Feed is `live` but which received no packet for
 * this long is replaced. Browsers take 5–30 s to call a silent connection
 * `disconnected`; a frozen picture that looks live is worse than a brief
 * "reconnecting".
 */
const STALL_MS = 3000;
const STALL_CHECK_MS = 1000;

/**
 * Exponential backoff with jitter: 0.5 s, 1 s, 2 s … capped, ±25 %.
 * @param {number} attempt 0-based
 * @param {number} [baseMs]
 * @param {number} [maxMs]
 */
export function backoffDelay(attempt, baseMs = 500, maxMs = 10000) {
  const raw = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 16));
  return Math.round(raw * (0.75 + Math.random() * 0.5));
}

/**
 * Resolve when ICE gathering is complete (or after `timeoutMs`: whatever was
 * gathered by then goes into the offer).
 * @param {RTCPeerConnection} pc
 * @param {number} [timeoutMs]
 * @returns {Promise<void>}
 */
export function iceGatheringComplete(pc, timeoutMs = 4000) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener('icegatheringstatechange', check);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === 'complete') done();
    };
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener('icegatheringstatechange', check);
  });
}

/**
 * The websocket URL for this page: same host, ws: or wss: matching the page.
 * @param {string} [path]
 * @param {{protocol: string, host: string}} [loc]
 */
export function websocketUrl(path = '/ws', loc = globalThis.location) {
  const scheme = loc.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${loc.host}${path}`;
}

/**
 * The websocket URL of the Node a `welcome` says serves this Session, when it
 * is not the Node that sent it (docs/protocol.md, "Several Nodes"); else null.
 * @param {{node?: {id?: string}, serving?: {id?: string, url?: string|null}}} welcome
 */
export function servingUrl(welcome) {
  const serving = welcome.serving;
  if (!serving || !serving.url || !welcome.node || serving.id === welcome.node.id) return null;
  try {
    return websocketUrl('/ws', new URL(serving.url));
  } catch {
    return null;
  }
}

/**
 * The websocket URL of a Node named by the server (`going_away`'s or an
 * error's `node`, the welcome's `nodes`); null if it has no usable URL.
 * @param {{url?: string|null}|null|undefined} node
 */
export function nodeSocketUrl(node) {
  if (!node || !node.url) return null;
  try {
    return websocketUrl('/ws', new URL(node.url));
  } catch {
    return null;
  }
}

/**
 * Where to try next after a socket to `failed` was lost (docs/protocol.md,
 * "Failover"): the Node after it in `candidates` (any live Node routes a page
 * to whoever serves its Session), skipping those that did not answer lately
 * unless none is left.
 * @param {string} failed
 * @param {string[]} candidates  websocket URLs, in a stable order
 * @param {(url: string) => boolean} unreachable
 */
export function nextNodeUrl(failed, candidates, unreachable) {
  const list = [...new Set(candidates)];
  if (!list.length) return failed;
  const start = list.indexOf(failed);
  for (let i = 1; i <= list.length; i++) {
    const url = list[(start + i) % list.length];
    if (!unreachable(url)) return url;
  }
  return list[(start + 1) % list.length];
}

/**
 * The same page on the Node behind a websocket URL, the token in its fragment
 * (as in an invite link: never sent to a server; the page there keeps it in
 * its own tab storage): where to go when this page's policy may not connect
 * there.
 * @param {string} socketUrl
 * @param {Location} loc
 * @param {string} token
 */
export function pageUrlOn(socketUrl, loc, token) {
  const url = new URL(socketUrl);
  const scheme = url.protocol === 'wss:' ? 'https:' : 'http:';
  const fragment = new URLSearchParams(loc.hash.replace(/^#/, ''));
  fragment.set('token', token);
  return `${scheme}//${url.host}${loc.pathname}${loc.search}#${fragment}`;
}

/** @param {string} a @param {string} b */
function sameHost(a, b) {
  try {
    return new URL(a).host === new URL(b).host;
  } catch {
    return false;
  }
}

/** An open socket whose hello got no answer by then goes to another Node. */
const WELCOME_TIMEOUT_MS = 10000;

/** A Node that did not answer is passed over for this long when failing over. */
const UNREACHABLE_MS = 10000;

/**
 * How often the socket's liveness is judged. A tick this much later than due
 * means this page's own timers were held back (a hidden tab, a sleeping
 * laptop, a busy main thread): that silence is not the Node's.
 */
const LIVENESS_TICK_MS = 1000;
const LATE_TICK_MS = 3000;

/** The Feed id of a slot and kind: `<slot>.<kind>`. */
export function feedId(/** @type {string} */ slot, /** @type {string} */ kind) {
  return `${slot}.${kind}`;
}

/** @param {string} id @returns {MediaKind|null} */
export function kindOfFeedId(id) {
  const kind = id.slice(id.lastIndexOf('.') + 1);
  return kind === 'audio' || kind === 'video' ? kind : null;
}

/** One slot published by this client over its own peer connection. */
export class Publication {
  /**
   * @param {string} slot
   * @param {MediaStreamTrack[]} tracks
   */
  constructor(slot, tracks) {
    this.slot = slot;
    /** Tracks are owned by the caller: unpublishing does not stop them. */
    this.tracks = tracks;
    this.stream = new MediaStream(tracks);
    /** @type {RTCPeerConnection|null} */
    this.pc = null;
    /** @type {PublicationState} */
    this.state = 'connecting';
    /** @type {string[]} Feed ids the server created for this slot. */
    this.feeds = [];
    /** @type {ScrubinError|null} */
    this.error = null;
    /** @type {Promise<void>|null} */
    this.negotiating = null;
    this.attempts = 0;
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this.retryTimer = undefined;
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this.disconnectTimer = undefined;
    /** Also send the camera as a low layer (a second video section). */
    this.lowLayer = true;
    /** @type {MediaStreamTrack|null} the camera at 15 fps for the low layer (ours to stop) */
    this.lowTrack = null;
  }
}

/** One Feed received by this client over its own peer connection. */
export class Subscription {
  /**
   * @param {string} feedId
   * @param {MediaKind} kind
   */
  constructor(feedId, kind) {
    this.feedId = feedId;
    this.kind = kind;
    /**
     * The Feed's media. A new MediaStream after every renegotiation: listen to
     * the client's `subscription` event and re-attach it.
     * @type {MediaStream}
     */
    this.stream = new MediaStream();
    /** @type {RTCPeerConnection|null} */
    this.pc = null;
    /** @type {string|null} the server's Subscription id */
    this.id = null;
    /** @type {SubscriptionState} */
    this.state = 'connecting';
    /** @type {ScrubinError|null} */
    this.error = null;
    /** @type {Promise<void>|null} */
    this.negotiating = null;
    this.attempts = 0;
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this.retryTimer = undefined;
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this.disconnectTimer = undefined;
    /**
     * Which layer of the camera to receive (docs/protocol.md, `set_layer`):
     * `auto` follows the link; thumbnails ask for `low`.
     * @type {'auto'|'full'|'low'}
     */
    this.wantLayer = 'auto';
    /** @type {'full'|'low'} the layer the server sends now */
    this.layer = 'full';
    /** Sent nothing by the server while hidden (`pause`). */
    this.paused = false;
    /** Packets received when last checked, and when that count last grew. */
    this.packets = 0;
    this.progressAt = 0;
  }
}

/**
 * @typedef {object} ClientOptions
 * @property {string} token          the participant's token (from the page's URL fragment)
 * @property {string} [url]          websocket URL; default: `/ws` on this page's host
 * @property {number} [requestTimeoutMs]
 * @property {number} [pingIntervalMs]  a socket quiet this long is sent a `ping`
 * @property {number} [silenceTimeoutMs]  a socket from which nothing at all arrived for this long
 *   is dropped: its Node froze or its machine left the network (no reset tells us)
 * @property {number} [maxReconnectDelayMs]
 * @property {number} [connectTimeoutMs]  a socket not open by then counts as a Node that does not answer
 * @property {typeof WebSocket} [WebSocket]
 * @property {typeof RTCPeerConnection} [RTCPeerConnection]
 */

export class ScrubinClient extends EventTarget {
  /** @param {ClientOptions} options */
  constructor(options) {
    super();
    if (!options || !options.token) throw new TypeError('ScrubinClient needs a token');
    this.token = options.token;
    this.url = options.url || websocketUrl();
    /** Where this page first connected: back there if the Node it moved to stops answering. */
    this.homeUrl = this.url;
    this._moves = 0;
    /** @type {string[]} websocket URLs of the live Nodes (the last welcome's `nodes`) */
    this.nodeUrls = [];
    /** @type {string|null} where the server said to reconnect (a draining Node's `node`) */
    this._hintUrl = null;
    /** @type {Map<string, number>} websocket URL -> when it last did not answer */
    this._unreachable = new Map();
    /** The current socket opened (a Node answered). */
    this._opened = false;
    /** @type {string} the code of the error the last hello got, if any */
    this._helloError = '';
    // Long enough for a loaded Node taking over Sessions to answer: one marked
    // unreachable is passed over for 10 s.
    this.connectTimeoutMs = options.connectTimeoutMs ?? 6000;
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this._openTimer = undefined;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 15000;
    // The Node sends a `keepalive` every 2 s when it has nothing else to say
    // (the hello asks for it); a ping covers a Node that does not. A loaded
    // Node may take a couple of seconds to answer: 7 s of complete silence
    // leaves it that, and fails over within 8 s of a Node vanishing.
    this.pingIntervalMs = options.pingIntervalMs ?? 3000;
    this.silenceTimeoutMs = options.silenceTimeoutMs ?? 7000;
    this.maxReconnectDelayMs = options.maxReconnectDelayMs ?? 10000;
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    /**
     * The last connection events (`[ms since epoch, what, url]`), newest last:
     * what support and hospital IT ask for when a page would not reconnect.
     * @type {Array<[number, string, string]>}
     */
    this.connectionLog = [];
    this._RTCPeerConnection = options.RTCPeerConnection || globalThis.RTCPeerConnection;

    /** @type {ClientState} */
    this.state = 'idle';
    /** @type {Participant|null} */
    this.participant = null;
    /** @type {Session|null} */
    this.session = null;
    /** @type {Participant[]} (experts and admins only; `[]` for others) */
    this.participants = [];
    this.viewers = 0;
    /** @type {RTCIceServer[]} */
    this.iceServers = [];
    /** @type {Map<string, Feed>} live and down Feeds of the Session */
    this.feeds = new Map();
    /** @type {Map<string, Publication>} by slot */
    this.publications = new Map();
    /** @type {Map<string, Subscription>} by Feed id */
    this.subscriptions = new Map();
    /** @type {ScrubinError|null} why the client stopped (state `failed`) */
    this.fatalError = null;
    /** @type {string} */
    this.endReason = '';
    /** Drawings, steps, questions, chat, hands, microphone, sterile focus. */
    this.interaction = new InteractionState();

    /** @type {WebSocket|null} */
    this._ws = null;
    this._nextId = 1;
    /** @type {Map<string, {resolve: (m: any) => void, reject: (e: Error) => void,
     *   timer: ReturnType<typeof setTimeout>, type: string}>} */
    this._pending = new Map();
    this._welcomed = false;
    this._everWelcomed = false;
    this._reconnectAttempt = 0;
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this._reconnectTimer = undefined;
    /** @type {ReturnType<typeof setInterval>|undefined} */
    this._livenessTimer = undefined;
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this._pongTimer = undefined;
    /** When the current socket last sent anything. */
    this._heardAt = 0;
    /** Since when its silence counts (the last message, or the last time our own timers were late). */
    this._quietSince = 0;
    this._pingAt = 0;
    this._tickAt = 0;
    /** @type {{resolve: (w: Welcome) => void, reject: (e: Error) => void}|null} */
    this._firstWelcome = null;
    /** @type {ReturnType<typeof setInterval>|undefined} */
    this._stallTimer = undefined;
    this._onOnline = () => this.checkConnection();
    /** @param {Event} event */
    this._onPolicyViolation = (event) => this._policyViolation(
      /** @type {SecurityPolicyViolationEvent} */ (event));
  }

  // -- connection ---------------------------------------------------------

  /**
   * Open the websocket and join; resolves with the first `welcome`. Rejects
   * only if joining cannot succeed (bad token, unknown or ended Session);
   * transient failures are retried.
   * @returns {Promise<Welcome>}
   */
  connect() {
    if (this.state !== 'idle') throw new Error(`connect() called in state ${this.state}`);
    globalThis.addEventListener?.('online', this._onOnline);
    globalThis.document?.addEventListener?.('securitypolicyviolation', this._onPolicyViolation);
    const first = new Promise((resolve, reject) => {
      this._firstWelcome = { resolve, reject };
    });
    this._open();
    return /** @type {Promise<Welcome>} */ (first);
  }

  /** Leave: close every peer connection and the socket; no reconnect. */
  close() {
    for (const slot of [...this.publications.keys()]) this._dropPublication(slot, 'stopped');
    for (const feed of [...this.subscriptions.keys()]) this._dropSubscription(feed, 'closed');
    this._shutdown('closed', 'closed by the page');
  }

  /** True when requests can be sent. */
  get ready() {
    return this.state === 'open';
  }

  /**
   * Check the connection now rather than at the next heartbeat: call it when
   * the page becomes visible again (a tablet waking up) or the network returns.
   */
  checkConnection() {
    if (this.state === 'reconnecting') {
      this._reconnectNow();
    } else if (this.ready) {
      const asked = Date.now();
      clearTimeout(this._pongTimer);
      this._pongTimer = setTimeout(() => {
        if (this.ready && this._heardAt < asked) this._scheduleReconnect('no reply to ping');
      }, 5000);
      this._ping();
    }
  }

  _open() {
    this._welcomed = false;
    this._setState(this._everWelcomed ? 'reconnecting' : 'connecting');
    this._opened = false;
    this._helloError = '';
    this._log('connect', this.url);
    let ws;
    try {
      ws = new this._WebSocket(this.url);
    } catch (err) {
      this._scheduleReconnect(String(err));
      return;
    }
    this._ws = ws;
    clearTimeout(this._openTimer);
    // A Node whose machine is gone never refuses: give up on it soon.
    this._openTimer = setTimeout(() => {
      if (ws === this._ws && !this._opened) this._scheduleReconnect('the server does not answer');
    }, this.connectTimeoutMs);
    ws.onopen = () => {
      this._log('open', this.url);
      this._opened = true;
      clearTimeout(this._openTimer);
      // A Node that froze between accepting the socket and answering hello
      // would otherwise hold the page here for good (the silence check starts
      // at welcome). A hello may wait ~2 s for a Session that is moving.
      this._openTimer = setTimeout(() => {
        if (ws !== this._ws || this._welcomed) return;
        this._unreachable.set(this.url, Date.now());
        this._scheduleReconnect('no answer to hello');
      }, WELCOME_TIMEOUT_MS);
      // keepalive: the Node says something at least every 2 s (see _checkLiveness).
      ws.send(JSON.stringify({ type: 'hello', token: this.token, id: this._newId(),
        keepalive: true }));
    };
    ws.onmessage = (event) => this._onMessage(ws, event);
    ws.onerror = () => {
      /* a close event follows; nothing to do here (and nothing to log) */
    };
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason);
  }

  /** @param {WebSocket} ws @param {number} code @param {string} reason */
  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    this._log(`closed ${code} ${reason}`, this.url);
    this._detachSocket();
    if (this.state === 'ended' || this.state === 'closed' || this.state === 'failed') return;
    const fatal = FATAL_CLOSE.get(code);
    if (fatal && !this._welcomed) {
      this._fail(this.fatalError || clientError(fatal, reason || `closed with ${code}`, 'user', code));
      return;
    }
    if (fatal) {
      // After welcome, 4400/1009 mean a client bug: surface it, but try again.
      this._emit('error', { error: clientError(fatal, reason || `closed with ${code}`, 'protocol'),
        request: null });
    }
    this._scheduleReconnect(reason || `socket closed (${code})`, code);
  }

  _detachSocket() {
    const ws = this._ws;
    this._ws = null;
    this._welcomed = false;
    clearInterval(this._livenessTimer);
    clearTimeout(this._pongTimer);
    clearTimeout(this._openTimer);
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      if (ws.readyState === ws.CONNECTING || ws.readyState === ws.OPEN) {
        try { ws.close(1000); } catch { /* already closing */ }
      }
    }
    for (const [id, pending] of this._pending) {
      clearTimeout(pending.timer);
      pending.reject(clientError('disconnected', 'the connection to the server dropped'));
      this._pending.delete(id);
    }
  }

  /**
   * The socket is gone (or never came up): pick the Node and the moment to
   * try again (docs/protocol.md, "Failover").
   * @param {string} reason
   * @param {number} [code] the close code, when the server closed it
   */
  _scheduleReconnect(reason, code = 0) {
    const failed = this.url;
    const answered = this._opened;
    const helloError = this._helloError;
    this._detachSocket();
    if (!answered) this._unreachable.set(failed, Date.now());
    let delay;
    if (this._hintUrl) {
      // A draining Node named where to go: at once.
      this.url = this._hintUrl;
      this._hintUrl = null;
      this._reconnectAttempt = 0;
      delay = Math.round(Math.random() * 100);
    } else if (answered && code === 1012) {
      // The Session moved: the Node we used routes us to it.
      delay = 100 + Math.round(Math.random() * 150);
    } else if (answered && code === 1013 && helloError === 'session_moving') {
      // The Node that held it went; this one takes it once its lease expires.
      delay = 400 + Math.round(Math.random() * 300);
    } else if (answered && code === 1013) {
      delay = backoffDelay(this._reconnectAttempt++, 500, this.maxReconnectDelayMs);
    } else {
      // The Node does not answer, or the connection dropped under us: the
      // next live Node (any routes us), soon; slower once all were tried.
      const candidates = [...this.nodeUrls, this.homeUrl];
      this.url = nextNodeUrl(failed, candidates, (url) => this._isUnreachable(url));
      const round = Math.floor(this._reconnectAttempt++ / new Set(candidates).size);
      // Failing over: keep the waits short (a live Node is among the candidates).
      delay = round === 0 ? 100 + Math.round(Math.random() * 200)
        : backoffDelay(round - 1, 500, Math.min(4000, this.maxReconnectDelayMs));
    }
    this._log(`${reason}; next in ${delay} ms`, this.url);
    this._setState('reconnecting', reason);
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._open(), delay);
  }

  /**
   * The page's Content-Security-Policy lists the Nodes known when it was
   * served; a Node that joined since is refused by the browser without a
   * close event (the socket would just time out). Pass it over at once, and
   * when no other Node is left, load this page from that Node.
   * @param {SecurityPolicyViolationEvent} event
   */
  _policyViolation(event) {
    if (!this._ws || this._opened || event.effectiveDirective !== 'connect-src'
        || !sameHost(event.blockedURI, this.url)) return;
    const blocked = this.url;
    this._log('refused by this page\'s security policy (a Node that joined after it loaded)', blocked);
    const others = [...this.nodeUrls, this.homeUrl]
      .filter((url) => url !== blocked && !this._isUnreachable(url));
    if (!others.length && globalThis.location) {
      this._shutdown('reconnecting', 'loading the page from the Node serving this Session');
      globalThis.location.assign(pageUrlOn(blocked, globalThis.location, this.token));
      return;
    }
    this._scheduleReconnect('this page may not connect to that Node');
  }

  /** @param {string} what @param {string} url */
  _log(what, url) {
    this.connectionLog.push([Date.now(), what, url]);
    if (this.connectionLog.length > 40) this.connectionLog.shift();
  }

  /** @param {string} url */
  _isUnreachable(url) {
    const when = this._unreachable.get(url);
    return when !== undefined && Date.now() - when < UNREACHABLE_MS;
  }

  _reconnectNow() {
    clearTimeout(this._reconnectTimer);
    if (!this._ws) this._open();
  }

  /** @param {ClientState} state @param {string} reason */
  _shutdown(state, reason) {
    clearTimeout(this._reconnectTimer);
    clearInterval(this._stallTimer);
    this._stallTimer = undefined;
    globalThis.removeEventListener?.('online', this._onOnline);
    globalThis.document?.removeEventListener?.('securitypolicyviolation', this._onPolicyViolation);
    this._detachSocket();
    this._setState(state, reason);
  }

  /** @param {ScrubinError} error */
  _fail(error) {
    this.fatalError = error;
    for (const slot of [...this.publications.keys()]) this._dropPublication(slot, 'failed');
    for (const feed of [...this.subscriptions.keys()]) this._dropSubscription(feed, 'failed');
    this._shutdown('failed', error.message);
    this._emit('error', { error, request: null });
    if (this._firstWelcome) {
      this._firstWelcome.reject(error);
      this._firstWelcome = null;
    }
  }

  /** @param {ClientState} state @param {string} [reason] */
  _setState(state, reason = '') {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this._emit('state', { state, previous, reason });
  }

  _startLiveness() {
    const now = Date.now();
    this._heardAt = this._quietSince = this._tickAt = now;
    this._pingAt = 0;
    clearInterval(this._livenessTimer);
    this._livenessTimer = setInterval(() => this._checkLiveness(), LIVENESS_TICK_MS);
  }

  /**
   * A socket to a Node that froze, or whose machine left the network, stays
   * open: no reset comes, the browser notices nothing for minutes. Any message
   * is proof of life (the Node's `keepalive`, a `pong`, anything), so a slow
   * answer is not mistaken for a dead Node; only complete silence for
   * `silenceTimeoutMs` drops the socket and fails over (docs/protocol.md,
   * "Failover").
   */
  _checkLiveness() {
    const now = Date.now();
    const late = now - this._tickAt > LATE_TICK_MS;
    this._tickAt = now;
    if (!this.ready) return;
    if (late) this._quietSince = now;
    const quiet = now - Math.max(this._heardAt, this._quietSince);
    if (quiet >= this.silenceTimeoutMs) {
      // Passed over like a Node that does not open (also when a welcome names it).
      this._unreachable.set(this.url, now);
      this._scheduleReconnect(`nothing from the server for ${(quiet / 1000).toFixed(1)} s`);
    } else if (quiet >= this.pingIntervalMs && now - this._pingAt >= this.pingIntervalMs) {
      this._ping();
    }
  }

  _ping() {
    this._pingAt = Date.now();
    // Its pong counts as any message does (_onMessage); no timer of its own.
    this.request({ type: 'ping' }).catch(() => {});
  }

  // -- messages -----------------------------------------------------------

  _newId() {
    return `c${this._nextId++}`;
  }

  /** @param {WebSocket} ws @param {MessageEvent} event */
  _onMessage(ws, event) {
    if (ws !== this._ws) return;
    this._heardAt = Date.now();
    let msg;
    try {
      msg = JSON.parse(event.data);
    } catch {
      return; // the server only sends JSON; ignore anything else
    }
    if (!msg || typeof msg !== 'object') return;

    if (!this._welcomed) {
      if (msg.type === 'welcome') {
        const target = servingUrl(msg);
        this._log(`welcome, serving ${target || 'here'}`, this.url);
        this._noteNodes(/** @type {Welcome} */ (msg));
        if (target && target !== this.url && this._isUnreachable(target)) {
          // It names a Node that just stopped answering (the registry has not
          // noticed yet): ask again shortly, by when another Node serves it.
          this._helloError = 'session_moving';
          this._scheduleReconnect('the Node serving this Session does not answer', 1013);
          return;
        }
        if (target && target !== this.url && this._moves < 3) {
          // Another Node serves this Session: connect there directly (no HTTP
          // redirect: browsers drop the token on cross-origin redirects).
          this._moves++;
          this.url = target;
          this._detachSocket();
          this._open();
          return;
        }
        this._moves = 0;
        this._onWelcome(/** @type {Welcome} */ (msg));
      } else if (msg.type === 'error' && msg.error) {
        const error = new ScrubinError(msg.error);
        this._helloError = error.code;
        this._hintUrl = nodeSocketUrl(msg.error.node) || this._hintUrl;
        if (error.code === 'session_ended') this._ended(error.message);
        else if (FATAL_HELLO_CODES.has(error.code)) this._fail(error);
        else this._emit('error', { error, request: 'hello' });
      } else if (msg.type === 'going_away') {
        this._hintUrl = nodeSocketUrl(msg.node);
        this._emit('going_away', { reason: msg.reason || '' });
      }
      return;
    }

    if (msg.id !== undefined && msg.id !== null && this._pending.has(String(msg.id))) {
      const pending = /** @type {NonNullable<ReturnType<typeof this._pending.get>>} */ (
        this._pending.get(String(msg.id)));
      this._pending.delete(String(msg.id));
      clearTimeout(pending.timer);
      if (msg.type === 'error') {
        const error = new ScrubinError(msg.error || { code: 'error', message: 'request failed',
          fault: 'server', status: 0 });
        if (pending.type !== 'ping') this._emit('error', { error, request: pending.type });
        pending.reject(error);
      } else {
        pending.resolve(msg);
      }
      return;
    }

    if (INTERACTION_MESSAGES.has(msg.type)) {
      this.interaction.apply(msg);
      this._emit('interaction', { type: msg.type, message: msg });
      return;
    }
    switch (msg.type) {
      case 'feed':
        if (msg.feed) this._onFeed(msg.feed);
        break;
      case 'roster':
        this.participants = Array.isArray(msg.participants) ? msg.participants : [];
        this.viewers = Number(msg.viewers) || 0;
        this._emit('roster', { participants: this.participants, viewers: this.viewers });
        break;
      case 'presence':
        // joined | left | dropped (a peer connection went quiet or failed: role, reason)
        this._emit('presence', {
          event: msg.event, participant: msg.participant, role: msg.role, reason: msg.reason,
          feed: msg.feed, slot: msg.slot,
        });
        break;
      case 'subscription_closed':
        this._onSubscriptionClosed(msg);
        break;
      case 'layer': {
        const sub = [...this.subscriptions.values()].find((x) => x.id === msg.subscription);
        if (sub && (msg.layer === 'full' || msg.layer === 'low')) {
          sub.layer = msg.layer;
          this._emit('subscription', { subscription: sub });
        }
        break;
      }
      case 'publication_ended':
        // Someone took this slot over: stop, and do not publish it again by ourselves.
        this._dropPublication(msg.slot, 'stopped', clientError('taken_over',
          `${msg.by?.name || 'someone'} took over ${msg.slot}`, 'user', 409));
        break;
      case 'slot_taken_over':
        this._emit('slot_taken_over', { slot: msg.slot, from: msg.from, by: msg.by });
        break;
      case 'recording': // {state: on|off|failed, since, error?} (client_web/js/recording.js)
        this._emit('recording', { recording: msg });
        break;
      case 'ice_servers':
        // Fresh TURN credentials for peer connections made from now on; those
        // already connected keep their relays.
        if (Array.isArray(msg.ice_servers)) this.iceServers = msg.ice_servers;
        break;
      case 'session_ended':
        this._ended(msg.reason || 'ended');
        break;
      case 'going_away':
        // The server closes with 1001 or 1012 next; a draining Node names the
        // Node to reconnect to, otherwise the next one routes us.
        this._hintUrl = nodeSocketUrl(msg.node);
        this._emit('going_away', { reason: msg.reason || '' });
        break;
      case 'error':
        if (msg.error) {
          const error = new ScrubinError(msg.error);
          // Revoked (or expired) while connected: reconnecting cannot help.
          if (FATAL_LATER_CODES.has(error.code)) this._fail(error);
          else this._emit('error', { error, request: null });
        }
        break;
      case 'keepalive':
        break; // the Node lives: _heardAt says so
      default:
        break; // pong for a timed-out ping, or a newer message type: ignore
    }
  }

  /** @param {Welcome} welcome */
  _noteNodes(welcome) {
    if (!Array.isArray(welcome.nodes)) return;
    const urls = welcome.nodes.map((n) => nodeSocketUrl(n)).filter((u) => u !== null);
    if (urls.length) this.nodeUrls = /** @type {string[]} */ (urls);
  }

  /** @param {Welcome} welcome */
  _onWelcome(welcome) {
    clearTimeout(this._openTimer);
    const reconnected = this._everWelcomed;
    this._welcomed = true;
    this._everWelcomed = true;
    this._reconnectAttempt = 0;
    this.participant = welcome.participant;
    this.session = welcome.session;
    this.participants = welcome.participants || [];
    this.viewers = Number(welcome.viewers) || 0;
    this.iceServers = Array.isArray(welcome.ice_servers) ? welcome.ice_servers : [];
    this.feeds = new Map((welcome.session?.feeds || []).map((f) => [f.id, f]));
    this._setState('open');
    this._startLiveness();
    this._emit('welcome', { welcome, reconnected });
    this._emit('roster', { participants: this.participants, viewers: this.viewers });
    if (this._firstWelcome) {
      this._firstWelcome.resolve(welcome);
      this._firstWelcome = null;
    }
    if (reconnected) this._resync();
    this._syncInteraction();
  }

  /** Fetch the interaction state after every (re)join: events may have been missed. */
  _syncInteraction() {
    this.request({ type: 'interaction_sync' }).then((state) => {
      this.interaction.reset(state);
      this._emit('interaction', { type: 'interaction_state', message: state });
    }, () => { /* disconnected meanwhile: the next welcome asks again */ });
  }

  /** @param {Feed} feed */
  _onFeed(feed) {
    if (feed.state === 'closed') this.feeds.delete(feed.id);
    else this.feeds.set(feed.id, feed);
    if (this.session) this.session.feeds = [...this.feeds.values()];
    this._emit('feed', { feed });

    if (feed.state === 'closed') {
      if (this.subscriptions.has(feed.id)) this._dropSubscription(feed.id, 'closed');
      const pub = this.publications.get(feed.slot);
      if (pub && pub.feeds.includes(feed.id) && !pub.negotiating) {
        // Closed under us: someone stopped this slot on purpose (an admin, the
        // expert's other tab, a WHIP DELETE). Respect it; don't publish again.
        this._dropPublication(feed.slot, 'stopped', clientError('feed_closed',
          `${feed.id} was stopped on the server`, 'user', 410));
      }
      return;
    }
    if (feed.state === 'down') {
      const pub = this.publications.get(feed.slot);
      if (pub && pub.feeds.includes(feed.id) && !pub.negotiating) {
        // Our own Feed went down while we think we publish it: our connection
        // is gone on the server side. Give a replacement a moment, then publish again.
        clearTimeout(pub.retryTimer);
        pub.retryTimer = setTimeout(() => {
          const now = this.feeds.get(feed.id);
          if (this.publications.get(pub.slot) === pub && !pub.negotiating && now
              && now.state === 'down') {
            this._renegotiatePublication(pub);
          }
        }, 1500);
      }
    }
  }

  /** @param {string} reason */
  _ended(reason) {
    this.endReason = reason;
    for (const slot of [...this.publications.keys()]) this._dropPublication(slot, 'stopped');
    for (const feed of [...this.subscriptions.keys()]) this._dropSubscription(feed, 'closed');
    this.feeds.clear();
    if (this.session) this.session.state = 'ended';
    this._shutdown('ended', reason);
    this._emit('session_ended', { reason });
    if (this._firstWelcome) {
      this._firstWelcome.reject(clientError('session_ended', reason, 'user', 410));
      this._firstWelcome = null;
    }
  }

  /**
   * Send a request and resolve with its reply (`answer`, `ok`, `pong`), or
   * reject with a ScrubinError (`error` reply, timeout or disconnection).
   * @param {{type: string, [key: string]: unknown}} message
   * @param {number} [timeoutMs]
   * @returns {Promise<any>}
   */
  request(message, timeoutMs = this.requestTimeoutMs) {
    const ws = this._ws;
    if (!ws || !this.ready) {
      return Promise.reject(clientError('not_connected', `not connected (${this.state})`));
    }
    const id = this._newId();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(clientError('timeout', `no reply to ${message.type} in ${timeoutMs} ms`));
      }, timeoutMs);
      this._pending.set(id, { resolve, reject, timer, type: message.type });
      ws.send(JSON.stringify({ ...message, id }));
    });
  }

  /** @param {string} type @param {object} detail */
  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /** @returns {RTCConfiguration} */
  _rtcConfig() {
    // The server's list, possibly empty: never a default public STUN server.
    return { iceServers: this.iceServers, bundlePolicy: 'max-bundle' };
  }

  /** After a reconnect: put every publication and Subscription back. */
  _resync() {
    for (const pub of this.publications.values()) {
      const feeds = pub.feeds.map((id) => this.feeds.get(id));
      const healthy = pub.pc && pub.pc.connectionState === 'connected'
        && feeds.length > 0 && feeds.every((f) => f && f.state === 'live');
      if (!healthy) this._renegotiatePublication(pub);
    }
    for (const sub of [...this.subscriptions.values()]) {
      if (!this.feeds.has(sub.feedId)) {
        this._dropSubscription(sub.feedId, 'closed');
      } else {
        // The server closed this socket's Subscriptions when it dropped.
        this._renegotiateSubscription(sub);
      }
    }
  }

  // -- publishing ---------------------------------------------------------

  /**
   * Publish a slot: its video and/or audio track become Feeds `<slot>.video`
   * and `<slot>.audio`. Publishing a slot again replaces its connection and
   * keeps the Feeds (and their viewers).
   * A slot has one publisher at a time: publishing a slot someone else
   * publishes fails with `slot_taken` unless `takeover` is set (the expert's
   * page may take a slot from an encoder; an encoder never from the page).
   * @param {string} slot
   * @param {MediaStream|MediaStreamTrack[]} media  at most one video and one audio track
   * A camera goes out as two layers, the full one and a low one (≈ 320×180,
   * 15 fps, ≤ 250 kbit/s) for thumbnails and weak links, unless `lowLayer` is false.
   * @param {{takeover?: boolean, lowLayer?: boolean}} [options]
   * @returns {Promise<Publication>}
   */
  async publish(slot, media, options = {}) {
    const tracks = Array.isArray(media) ? media : media.getTracks();
    if (!tracks.length) throw new TypeError('publish() needs at least one track');
    const previous = this.publications.get(slot);
    const pub = new Publication(slot, tracks);
    pub.lowLayer = options.lowLayer !== false;
    this.publications.set(slot, pub);
    try {
      await this._negotiatePublication(pub, previous?.pc || null, Boolean(options.takeover));
    } catch (err) {
      if (this.publications.get(slot) === pub) {
        // Nothing is kept from a refused request: the previous connection, if
        // any, still carries the slot.
        if (previous) this.publications.set(slot, previous);
        else this.publications.delete(slot);
        this._setPublicationState(pub, 'failed', /** @type {any} */ (err));
      }
      throw err;
    }
    if (previous) {
      clearTimeout(previous.retryTimer);
      clearTimeout(previous.disconnectTimer);
    }
    return pub;
  }

  /**
   * Switch a live slot to other tracks (another camera or microphone). With
   * the same kinds this swaps the tracks on the existing connection, so viewers
   * see no interruption; otherwise the slot is published again.
   * @param {string} slot
   * @param {MediaStream|MediaStreamTrack[]} media
   * @returns {Promise<Publication>}
   */
  async replaceTracks(slot, media) {
    const tracks = Array.isArray(media) ? media : media.getTracks();
    const pub = this.publications.get(slot);
    if (!pub || !pub.pc || pub.negotiating) return this.publish(slot, tracks);
    const senders = pub.pc.getTransceivers().map((t) => t.sender);
    const kinds = (/** @type {MediaStreamTrack[]} */ list) => list.map((t) => t.kind).sort().join();
    const senderKinds = [...new Set(senders.map((s) => s.track?.kind).filter(Boolean))]
      .sort().join();
    if (kinds(tracks) !== kinds(pub.tracks) || senderKinds !== kinds(pub.tracks)) {
      const wanted = new Set(tracks.map((t) => t.kind));
      if (pub.tracks.some((t) => !wanted.has(t.kind))) {
        // A kind is switched off (camera off, microphone kept): its Feed must
        // close now. Publishing again would leave it `down`, and trainees
        // "waiting for camera" until the server's grace period ends.
        await this.unpublish(slot);
      }
      return this.publish(slot, tracks);
    }
    for (const track of tracks) {
      for (const sender of senders.filter((s) => s.track && s.track.kind === track.kind)) {
        if (pub.lowTrack && sender.track === pub.lowTrack) {
          // The low layer follows the new camera at its own frame rate.
          const low = await lowLayerTrack(track);
          await sender.replaceTrack(low);
          pub.lowTrack.stop();
          pub.lowTrack = low;
        } else {
          await sender.replaceTrack(track);
        }
      }
    }
    pub.tracks = tracks;
    pub.stream = new MediaStream(tracks);
    this._emit('publication', { publication: pub });
    return pub;
  }

  /**
   * @param {Publication} pub
   * @param {RTCPeerConnection|null} replaces closed once the new one is answered
   * @param {boolean} [takeover] replace whoever else publishes the slot
   */
  _negotiatePublication(pub, replaces, takeover = false) {
    const run = async () => {
      const pc = new this._RTCPeerConnection(this._rtcConfig());
      try {
        for (const track of pub.tracks) {
          pc.addTransceiver(track, { direction: 'sendonly', streams: [pub.stream] });
        }
        const video = pub.tracks.find((t) => t.kind === 'video');
        if (video && pub.lowLayer) {
          // The same camera again, smaller: aiortc cannot receive simulcast, so
          // the low layer is its own section (docs/protocol.md, "Layers").
          const low = await lowLayerTrack(video);
          pub.lowTrack?.stop();
          pub.lowTrack = low;
          const height = video.getSettings().height || 720;
          pc.addTransceiver(low, {
            direction: 'sendonly', streams: [pub.stream],
            sendEncodings: [{ scaleResolutionDownBy: Math.max(1, height / 180),
              maxBitrate: LOW_LAYER_BPS }],
          });
        }
        await pc.setLocalDescription(await pc.createOffer());
        await iceGatheringComplete(pc);
        const reply = await this.request({
          type: 'publish', slot: pub.slot, sdp: /** @type {RTCSessionDescription} */ (pc.localDescription).sdp,
          ...(takeover ? { takeover: true } : {}),
        });
        if (this.publications.get(pub.slot) !== pub) throw clientError('cancelled', 'unpublished');
        await pc.setRemoteDescription({ type: 'answer', sdp: reply.sdp });
        pub.feeds = Array.isArray(reply.feeds) ? reply.feeds : [];
      } catch (err) {
        pc.close();
        throw err;
      }
      const old = pub.pc || replaces;
      pub.pc = pc;
      if (old && old !== pc) old.close();
      this._watchPublication(pub, pc);
      this._setPublicationState(pub, pc.connectionState === 'connected' ? 'live' : 'connecting');
    };
    const attempt = run().finally(() => { pub.negotiating = null; });
    pub.negotiating = attempt;
    return attempt;
  }

  /** @param {Publication} pub @param {RTCPeerConnection} pc */
  _watchPublication(pub, pc) {
    pc.addEventListener('connectionstatechange', () => {
      if (pub.pc !== pc || this.publications.get(pub.slot) !== pub) return;
      clearTimeout(pub.disconnectTimer);
      switch (pc.connectionState) {
        case 'connected':
          pub.attempts = 0;
          this._setPublicationState(pub, 'live');
          break;
        case 'disconnected':
          this._setPublicationState(pub, 'reconnecting');
          pub.disconnectTimer = setTimeout(() => {
            if (pub.pc === pc && pc.connectionState !== 'connected') {
              this._renegotiatePublication(pub);
            }
          }, DISCONNECTED_GRACE_MS);
          break;
        case 'failed':
        case 'closed':
          this._renegotiatePublication(pub);
          break;
        default:
          break;
      }
    });
  }

  /** @param {Publication} pub */
  _schedulePublishRetry(pub) {
    clearTimeout(pub.retryTimer);
    this._setPublicationState(pub, 'reconnecting');
    const delay = backoffDelay(pub.attempts++, 500, this.maxReconnectDelayMs);
    pub.retryTimer = setTimeout(() => {
      if (this.publications.get(pub.slot) === pub) this._renegotiatePublication(pub);
    }, delay);
  }

  /** Publish an existing publication again (same tracks), now or when connected. */
  _renegotiatePublication(/** @type {Publication} */ pub) {
    if (pub.negotiating || this.publications.get(pub.slot) !== pub) return;
    clearTimeout(pub.retryTimer);
    this._setPublicationState(pub, 'reconnecting');
    if (!this.ready) return; // _resync() runs after the next welcome
    if (pub.tracks.every((t) => t.readyState === 'ended')) {
      this._setPublicationState(pub, 'failed',
        clientError('source_ended', `the camera or microphone of ${pub.slot} stopped`, 'user'));
      return;
    }
    this._negotiatePublication(pub, null).catch((err) => {
      if (this.publications.get(pub.slot) !== pub) return;
      const error = toScrubinError(err);
      if (error.fault === 'server' || error.code === 'disconnected' || error.code === 'timeout') {
        this._schedulePublishRetry(pub);
      } else {
        // The server refuses (role, slot, codec): retrying will not help.
        this.publications.delete(pub.slot);
        pub.pc?.close();
        this._setPublicationState(pub, 'failed', error);
      }
    });
  }

  /**
   * Stop publishing a slot: its Feeds close for every viewer. The tracks are
   * the caller's to stop.
   * @param {string} slot
   */
  async unpublish(slot) {
    const pub = this.publications.get(slot);
    if (!pub) return;
    // Forget it first so its connection closing is not taken for a failure,
    // but close that connection only once the server has closed the Feeds:
    // the other way round the server sees a dropped publisher (Feeds `down`,
    // waiting for it) before it reads the unpublish.
    this.publications.delete(slot);
    clearTimeout(pub.retryTimer);
    clearTimeout(pub.disconnectTimer);
    try {
      if (this.ready) await this.request({ type: 'unpublish', slot });
    } finally {
      pub.pc?.close();
      pub.lowTrack?.stop();
      this._setPublicationState(pub, 'stopped');
    }
  }

  /**
   * @param {string} slot
   * @param {PublicationState} state
   * @param {ScrubinError|null} [error]
   */
  _dropPublication(slot, state, error = null) {
    const pub = this.publications.get(slot);
    if (!pub) return;
    this.publications.delete(slot);
    clearTimeout(pub.retryTimer);
    clearTimeout(pub.disconnectTimer);
    pub.pc?.close();
    pub.lowTrack?.stop();
    this._setPublicationState(pub, state, error);
  }

  /**
   * @param {Publication} pub
   * @param {PublicationState} state
   * @param {ScrubinError|null} [error]
   */
  _setPublicationState(pub, state, error = null) {
    if (pub.state === state && !error) return;
    pub.state = state;
    if (error) pub.error = toScrubinError(error);
    else if (state === 'live') pub.error = null;
    this._emit('publication', { publication: pub });
  }

  // -- viewing ------------------------------------------------------------

  /**
   * Receive a Feed over its own peer connection. Resolves once the server
   * answered; media follows when the connection is up. Subscribing twice
   * returns the same Subscription.
   * @param {string} id  a Feed id, e.g. `room.video`
   * @returns {Promise<Subscription>}
   */
  async subscribe(id) {
    const existing = this.subscriptions.get(id);
    if (existing) {
      if (existing.negotiating) await existing.negotiating;
      return existing;
    }
    const kind = this.feeds.get(id)?.kind || kindOfFeedId(id);
    if (!kind) throw clientError('unknown_feed', `no feed ${id}`, 'user', 404);
    const sub = new Subscription(id, kind);
    this.subscriptions.set(id, sub);
    try {
      await this._negotiateSubscription(sub);
    } catch (err) {
      if (this.subscriptions.get(id) === sub) {
        this.subscriptions.delete(id);
        this._setSubscriptionState(sub, 'failed', /** @type {any} */ (err));
      }
      throw err;
    }
    return sub;
  }

  /** @param {Subscription} sub */
  _negotiateSubscription(sub) {
    const run = async () => {
      const pc = new this._RTCPeerConnection(this._rtcConfig());
      const stream = new MediaStream();
      let reply;
      try {
        const transceiver = pc.addTransceiver(sub.kind, { direction: 'recvonly' });
        stream.addTrack(transceiver.receiver.track);
        await pc.setLocalDescription(await pc.createOffer());
        await iceGatheringComplete(pc);
        reply = await this.request({
          type: 'subscribe', feed: sub.feedId,
          sdp: /** @type {RTCSessionDescription} */ (pc.localDescription).sdp,
        });
        if (this.subscriptions.get(sub.feedId) !== sub) {
          this._unsubscribeQuietly(reply.subscription);
          throw clientError('cancelled', 'unsubscribed');
        }
        await pc.setRemoteDescription({ type: 'answer', sdp: reply.sdp });
      } catch (err) {
        pc.close();
        throw err;
      }
      const oldPc = sub.pc;
      const oldId = sub.id;
      sub.pc = pc;
      sub.id = reply.subscription;
      sub.stream = stream;
      if (oldPc) oldPc.close();
      if (oldId && oldId !== sub.id) this._unsubscribeQuietly(oldId);
      this._watchSubscription(sub, pc);
      sub.layer = sub.wantLayer === 'low' ? 'low' : 'full';
      queueMicrotask(() => {
        if (sub.pc !== pc) return;
        this._sendLayer(sub);
        if (sub.paused && this.ready) {
          this.request({ type: 'pause', subscription: sub.id }).catch(() => {});
        }
      });
      sub.packets = 0;
      sub.progressAt = Date.now();
      if (sub.kind === 'video' && !this._stallTimer) {
        this._stallTimer = setInterval(() => this._checkStalls(), STALL_CHECK_MS);
      }
      this._setSubscriptionState(sub, pc.connectionState === 'connected' ? 'connected' : 'connecting',
        null, true);
    };
    const attempt = run().finally(() => { sub.negotiating = null; });
    sub.negotiating = attempt;
    return attempt;
  }

  /** @param {string|null} id */
  _unsubscribeQuietly(id) {
    if (id && this.ready) this.request({ type: 'unsubscribe', subscription: id }).catch(() => {});
  }

  /** @param {Subscription} sub @param {RTCPeerConnection} pc */
  _watchSubscription(sub, pc) {
    pc.addEventListener('connectionstatechange', () => {
      if (sub.pc !== pc || this.subscriptions.get(sub.feedId) !== sub) return;
      clearTimeout(sub.disconnectTimer);
      switch (pc.connectionState) {
        case 'connected':
          sub.attempts = 0;
          this._setSubscriptionState(sub, 'connected');
          break;
        case 'disconnected':
          this._setSubscriptionState(sub, 'reconnecting');
          sub.disconnectTimer = setTimeout(() => {
            if (sub.pc === pc && pc.connectionState !== 'connected') {
              this._scheduleSubscribeRetry(sub);
            }
          }, SUBSCRIPTION_DISCONNECTED_GRACE_MS);
          break;
        case 'failed':
        case 'closed':
          this._scheduleSubscribeRetry(sub);
          break;
        default:
          break;
      }
    });
  }

  /** Replace video Subscriptions that stopped receiving while their Feed is live. */
  async _checkStalls() {
    const now = Date.now();
    const videos = [...this.subscriptions.values()].filter((s) => s.kind === 'video');
    if (!videos.length) {
      clearInterval(this._stallTimer);
      this._stallTimer = undefined;
      return;
    }
    for (const sub of videos) {
      const pc = sub.pc;
      const feed = this.feeds.get(sub.feedId);
      if (!pc || sub.negotiating || sub.paused || sub.state !== 'connected' || !feed
          || feed.state !== 'live' || !this.ready) {
        // Nothing is expected to arrive (a `down` Feed waits for its publisher,
        // a `stalled` one for its camera).
        sub.progressAt = now;
        continue;
      }
      let packets = 0;
      try {
        (await pc.getStats()).forEach((/** @type {any} */ r) => {
          if (r.type === 'inbound-rtp' && r.kind === 'video') packets += r.packetsReceived || 0;
        });
      } catch {
        continue; // closed meanwhile
      }
      if (sub.pc !== pc) continue;
      if (packets !== sub.packets) {
        sub.packets = packets;
        sub.progressAt = now;
      } else if (now - sub.progressAt > STALL_MS) {
        sub.progressAt = now;
        this._renegotiateSubscription(sub);
      }
    }
  }

  /**
   * The server let go of one of our Subscriptions (docs/protocol.md,
   * `subscription_closed`): its connection went quiet or failed on the server's
   * side. Ask for a new one unless the Feed itself is gone.
   * @param {{subscription?: string, feed?: string, reason?: string}} msg
   */
  _onSubscriptionClosed(msg) {
    const sub = [...this.subscriptions.values()].find((s) => s.id === msg.subscription);
    if (!sub || sub.negotiating) return;
    if (msg.reason === 'feed_closed' || msg.reason === 'revoked') {
      this._dropSubscription(sub.feedId, 'closed');
      return;
    }
    this._scheduleSubscribeRetry(sub);
  }

  /** @param {Subscription} sub */
  _scheduleSubscribeRetry(sub) {
    clearTimeout(sub.retryTimer);
    this._setSubscriptionState(sub, 'reconnecting');
    const delay = backoffDelay(sub.attempts++, 300, this.maxReconnectDelayMs);
    sub.retryTimer = setTimeout(() => this._renegotiateSubscription(sub), delay);
  }

  /** @param {Subscription} sub */
  _renegotiateSubscription(sub) {
    if (sub.negotiating || this.subscriptions.get(sub.feedId) !== sub) return;
    clearTimeout(sub.retryTimer);
    this._setSubscriptionState(sub, 'reconnecting');
    if (!this.ready) return; // _resync() runs after the next welcome
    if (!this.feeds.has(sub.feedId)) {
      this._dropSubscription(sub.feedId, 'closed');
      return;
    }
    this._negotiateSubscription(sub).catch((err) => {
      if (this.subscriptions.get(sub.feedId) !== sub) return;
      const error = toScrubinError(err);
      if (FEED_GONE_CODES.has(error.code)) {
        this._dropSubscription(sub.feedId, 'closed');
      } else if (error.fault === 'server' || error.code === 'disconnected'
                 || error.code === 'timeout' || error.code === 'not_connected') {
        this._scheduleSubscribeRetry(sub);
      } else {
        this._dropSubscription(sub.feedId, 'failed', error);
      }
    });
  }

  /**
   * Which layer of a camera to receive: `auto` (follow the link), `full` or
   * `low` (thumbnails). Remembered across reconnections.
   * @param {string} id  the Feed id
   * @param {'auto'|'full'|'low'} layer
   */
  setLayer(id, layer) {
    const sub = this.subscriptions.get(id);
    if (!sub || sub.kind !== 'video' || sub.wantLayer === layer) return;
    sub.wantLayer = layer;
    if (!sub.negotiating) this._sendLayer(sub);
  }

  /** @param {Subscription} sub */
  _sendLayer(sub) {
    // While negotiating, sub.id is the old Subscription's: the new one sends it.
    if (!sub.id || !this.ready) return;
    if (sub.wantLayer !== 'auto' || sub.layer !== 'full') {
      this.request({ type: 'set_layer', subscription: sub.id, layer: sub.wantLayer })
        .catch(() => { /* gone meanwhile: the next negotiation sends it again */ });
    }
  }

  /**
   * Stop (or restart) receiving a video the page does not show; the connection
   * stays up, so showing it again is quick.
   * @param {string} id  the Feed id
   * @param {boolean} paused
   */
  setPaused(id, paused) {
    const sub = this.subscriptions.get(id);
    if (!sub || sub.paused === paused) return;
    sub.paused = paused;
    if (sub.id && this.ready && !sub.negotiating) {
      this.request({ type: paused ? 'pause' : 'resume', subscription: sub.id }).catch(() => {});
    }
  }

  /**
   * Stop receiving a Feed.
   * @param {string} id  the Feed id
   */
  async unsubscribe(id) {
    const sub = this.subscriptions.get(id);
    if (!sub) return;
    const serverId = sub.id;
    this._dropSubscription(id, 'closed');
    if (serverId && this.ready) {
      await this.request({ type: 'unsubscribe', subscription: serverId }).catch((err) => {
        // Already gone on the server (the Feed closed first) is fine.
        if (toScrubinError(err).code !== 'unknown_resource') throw err;
      });
    }
  }

  /**
   * @param {string} id
   * @param {SubscriptionState} state
   * @param {ScrubinError|null} [error]
   */
  _dropSubscription(id, state, error = null) {
    const sub = this.subscriptions.get(id);
    if (!sub) return;
    this.subscriptions.delete(id);
    clearTimeout(sub.retryTimer);
    clearTimeout(sub.disconnectTimer);
    sub.pc?.close();
    this._setSubscriptionState(sub, state, error);
  }

  /**
   * @param {Subscription} sub
   * @param {SubscriptionState} state
   * @param {ScrubinError|null} [error]
   * @param {boolean} [streamChanged]
   */
  _setSubscriptionState(sub, state, error = null, streamChanged = false) {
    if (sub.state === state && !error && !streamChanged) return;
    sub.state = state;
    if (error) sub.error = toScrubinError(error);
    else if (state === 'connected') sub.error = null;
    this._emit('subscription', { subscription: sub, streamChanged });
  }

  // -- live interaction ---------------------------------------------------

  /**
   * Draw on a video Feed (expert). Coordinates are normalised to the video's
   * picture (0–1, letterboxing excluded).
   * @param {string} feed
   * @param {Shape} shape
   * @param {{pinned?: boolean, fadeS?: number, media?: Record<string, number>}} [options]
   * @returns {Promise<Annotation>}
   */
  async annotate(feed, shape, options = {}) {
    /** @type {Record<string, unknown>} */
    const message = { type: 'annotate', feed, shape, pinned: Boolean(options.pinned) };
    if (options.fadeS !== undefined) message.fade_s = options.fadeS;
    if (options.media) message.media = options.media;
    const reply = await this.request(/** @type {any} */ (message));
    return reply.annotation;
  }

  /** @param {string} id @param {boolean} pinned */
  async pinAnnotation(id, pinned) {
    return (await this.request({ type: 'annotation_pin', annotation: id, pinned })).annotation;
  }

  /** Clear the drawings of one Feed, or of all (expert, admin). @param {string|null} [feed] */
  async clearAnnotations(feed = null) {
    await this.request(feed ? { type: 'annotations_clear', feed } : { type: 'annotations_clear' });
  }

  /**
   * Mark a procedure step (it becomes the current one) or a bookmark (expert).
   * @param {string} name @param {'step'|'bookmark'} [kind]
   * @returns {Promise<Mark>}
   */
  async mark(name, kind = 'step') {
    return (await this.request({ type: 'mark', name, kind })).mark;
  }

  /** Ask a question (trainee). @param {string} text @returns {Promise<Question>} */
  async ask(text) {
    const { question } = await this.request({ type: 'ask', text });
    this.interaction.questions.set(question.id, question);
    this._emit('interaction', { type: 'question', message: { type: 'question', question } });
    return question;
  }

  /** Upvote (or take back a vote for) someone else's question (trainee). */
  async vote(/** @type {string} */ id, up = true) {
    const reply = await this.request({ type: 'vote', question: id, up });
    if (up) this.interaction.voted.add(id);
    else this.interaction.voted.delete(id);
    this.interaction.questions.set(id, reply.question);
    this._emit('interaction', { type: 'question', message: { type: 'question', question: reply.question } });
    return reply.question;
  }

  /**
   * Mark a question answered, dismissed or open again (expert, admin).
   * @param {string} id @param {'open'|'answered'|'dismissed'} status
   */
  async setQuestionStatus(id, status) {
    return (await this.request({ type: 'question_status', question: id, status })).question;
  }

  /** Say something in the Session's chat. @param {string} text */
  async chat(text) {
    return (await this.request({ type: 'chat', text })).message;
  }

  /** Raise or lower this trainee's hand. */
  async raiseHand(raised = true) {
    const reply = await this.request({ type: 'hand', raised });
    return reply.raised;
  }

  /** Lower someone's hand (expert, admin). @param {string} participantId */
  async lowerHand(participantId) {
    await this.request({ type: 'hand', raised: false, participant: participantId });
  }

  /** Give a trainee the microphone; whoever had it loses it (expert, admin). */
  async grantMic(/** @type {string} */ participantId) {
    return (await this.request({ type: 'mic_grant', participant: participantId })).mic;
  }

  /** Take the microphone back (expert, admin), or give it back (its holder). */
  async revokeMic() {
    await this.request({ type: 'mic_revoke' });
  }

  /** Sterile focus: silence every trainee input (expert, admin). */
  async setSterile(/** @type {boolean} */ on) {
    await this.request({ type: 'sterile', on });
  }

  /**
   * The trainee given the microphone publishes it (audio only).
   * @param {MediaStreamTrack} track
   */
  publishMic(track) {
    return this.publish(MIC_SLOT, [track]);
  }

  // -- moderation ---------------------------------------------------------

  /** End the Session for everyone (expert, admin). */
  async endSession() {
    await this.request({ type: 'end_session' });
  }
}

/**
 * @param {unknown} err
 * @returns {ScrubinError}
 */
export function toScrubinError(err) {
  if (err instanceof ScrubinError) return err;
  const e = /** @type {any} */ (err);
  if (e && e.name === 'NotAllowedError') {
    return clientError('permission_denied', e.message || 'permission denied', 'user');
  }
  return clientError('client_error', (e && e.message) || String(err), 'server');
}

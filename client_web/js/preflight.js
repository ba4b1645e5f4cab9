// @ts-check
/**
 * The connection check a participant opens from their invite before a Session
 * (`/preflight.html#token=…`, linked from the join page): can this browser and
 * network receive the live video, directly or through the TURN relay, and fast
 * enough? It ends with a verdict in plain words and, when something is
 * blocked, a note for the hospital's IT department.
 *
 * Each check is a data-channel-only peer connection to the Node
 * (`POST /api/sessions/{session}/preflight`, docs/protocol.md "Connection
 * checks"): one with no ICE servers (direct), one per TURN transport with the
 * relay-only policy. Over the best that connects the Node sends a burst of
 * data and the page measures how fast it arrives. A check does not use up the
 * invite and nobody in the Session sees it.
 *
 * `window.scrubinPreflight` exposes `{state, result}` for tests.
 */

import { iceGatheringComplete } from './protocol.js';
import { takeToken, tokenClaims } from './token.js';
import { $, el, joinFailure } from './ui.js';

const CONNECT_TIMEOUT_MS = 10000;
const GATHER_TIMEOUT_MS = 5000;
const TRANSPORT_WORDS = {
  udp: 'through the relay server over UDP',
  tcp: 'through the relay server over TCP',
  tls: 'through the relay server over TLS (like a secure web page)',
};
const TRANSPORT_ORDER = ['udp', 'tcp', 'tls'];

/**
 * @typedef {{url: string, transport: 'udp'|'tcp'|'tls'}} TurnUrl
 * @typedef {{session: {id: string, title: string, state: string}, ice_servers: RTCIceServer[],
 *            turn: TurnUrl[], video_kbps: {min: number, good: number},
 *            download: {bytes: number, seconds: number}}} Info
 * @typedef {{ok: boolean, detail: string, pc: RTCPeerConnection|null,
 *            channel: RTCDataChannel|null, rttMs: number|null, remote: string[]}} PathResult
 */

export const state = { state: 'checking', result: /** @type {any} */ (null) };
// @ts-ignore — for tests and support staff
window.scrubinPreflight = state;

class CheckError extends Error {
  /** @param {{code?: string, message?: string, fault?: string, status?: number}} body */
  constructor(body) {
    super(body.message || body.code || 'request failed');
    this.body = body;
  }
}

/** @param {string} token @param {string} path @param {RequestInit} [init] */
async function api(token, path, init = {}) {
  const response = await fetch(path, {
    ...init,
    headers: { Authorization: `Bearer ${token}`, ...(init.headers || {}) },
    cache: 'no-store',
    credentials: 'omit',
  });
  if (!response.ok) {
    let body = { code: 'http_error', message: `HTTP ${response.status}`, fault: 'server' };
    try {
      body = await response.json();
    } catch {
      /* not JSON: keep the status */
    }
    throw new CheckError(body);
  }
  return response;
}

/** @param {string} step @param {string} mark @param {string} [detail] */
function setStep(step, mark, detail = '') {
  const row = /** @type {HTMLElement} */ ($(`[data-step="${step}"]`));
  row.dataset.state = mark;
  $('.pf-detail', row).textContent = detail;
}

/** @param {string} step @param {string} name */
function addStep(step, name) {
  const speed = $('[data-step="speed"]');
  const row = el('li', { 'data-step': step, 'data-state': 'pending' },
    el('span', { class: 'pf-name' }, name), el('span', { class: 'pf-detail muted' }));
  speed.before(row);
}

/** Remote candidate addresses of an answer, e.g. "192.0.2.7:50123 (udp)". @param {string} sdp */
function candidateAddresses(sdp) {
  return sdp.split(/\r?\n/).filter((l) => l.startsWith('a=candidate:')).map((line) => {
    const parts = line.split(' ');
    return `${parts[4]}:${parts[5]} (${String(parts[2]).toLowerCase()})`;
  });
}

/**
 * One check: a data channel to the Node with these ICE servers and policy.
 * @param {string} token @param {string} sessionId
 * @param {RTCIceServer[]} iceServers @param {RTCIceTransportPolicy} policy
 * @returns {Promise<PathResult>}
 */
async function checkPath(token, sessionId, iceServers, policy) {
  const pc = new RTCPeerConnection({ iceServers, iceTransportPolicy: policy });
  const channel = pc.createDataChannel('preflight');
  channel.binaryType = 'arraybuffer';
  /** @param {string} detail @returns {PathResult} */
  const failed = (detail) => {
    pc.close();
    return { ok: false, detail, pc: null, channel: null, rttMs: null, remote: [] };
  };
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc, GATHER_TIMEOUT_MS);
    const offer = pc.localDescription?.sdp || '';
    if (policy === 'relay' && !/ typ relay/.test(offer)) {
      return failed('the relay server could not be reached');
    }
    const response = await api(token, `/api/sessions/${encodeURIComponent(sessionId)}/preflight`, {
      method: 'POST', headers: { 'Content-Type': 'application/sdp' }, body: offer,
    });
    const answer = await response.text();
    await pc.setRemoteDescription({ type: 'answer', sdp: answer });
    const opened = await new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), CONNECT_TIMEOUT_MS);
      channel.addEventListener('open', () => { clearTimeout(timer); resolve(true); });
      pc.addEventListener('connectionstatechange', () => {
        if (pc.connectionState === 'failed') { clearTimeout(timer); resolve(false); }
      });
    });
    if (!opened) return failed('no connection (blocked by a firewall?)');
    const rttMs = await ping(channel);
    return { ok: true, detail: rttMs === null ? 'works' : `works (${rttMs} ms round trip)`,
      pc, channel, rttMs, remote: candidateAddresses(answer) };
  } catch (err) {
    if (err instanceof CheckError) throw err; // the token or the server: not the network
    return failed(`could not connect (${err instanceof Error ? err.message : err})`);
  }
}

/** @param {RTCDataChannel} channel @returns {Promise<number|null>} */
function ping(channel) {
  return new Promise((resolve) => {
    const sent = performance.now();
    const timer = setTimeout(() => { channel.removeEventListener('message', on); resolve(null); }, 3000);
    /** @param {MessageEvent} event */
    function on(event) {
      if (typeof event.data !== 'string') return;
      try {
        if (JSON.parse(event.data).type !== 'pong') return;
      } catch {
        return;
      }
      clearTimeout(timer);
      channel.removeEventListener('message', on);
      resolve(Math.round(performance.now() - sent));
    }
    channel.addEventListener('message', on);
    channel.send(JSON.stringify({ type: 'ping', t: Date.now() }));
  });
}

/**
 * The Node sends `bytes` (at most `seconds`); kbit/s as received here.
 * @param {RTCDataChannel} channel @param {number} bytes @param {number} seconds
 * @returns {Promise<{kbps: number, bytes: number}|null>}
 */
function download(channel, bytes, seconds) {
  return new Promise((resolve) => {
    let received = 0;
    let last = 0;
    const start = performance.now();
    const timer = setTimeout(finish, (seconds + 3) * 1000);
    function finish() {
      clearTimeout(timer);
      channel.removeEventListener('message', on);
      const elapsed = ((last || performance.now()) - start) / 1000;
      resolve(received && elapsed > 0 ? { kbps: (received * 8) / elapsed / 1000, bytes: received }
        : null);
    }
    /** @param {MessageEvent} event */
    function on(event) {
      if (event.data instanceof ArrayBuffer) {
        received += event.data.byteLength;
        last = performance.now();
      } else if (typeof event.data === 'string' && event.data.includes('"done"')) {
        finish();
      }
    }
    channel.addEventListener('message', on);
    channel.send(JSON.stringify({ type: 'download', bytes, seconds }));
  });
}

/** What the browser itself can do. */
function browserCheck() {
  if (typeof RTCPeerConnection !== 'function') {
    return { ok: false, detail: 'no WebRTC: this browser cannot play live video' };
  }
  const codecs = (globalThis.RTCRtpReceiver?.getCapabilities?.('video')?.codecs || [])
    .map((c) => c.mimeType.toLowerCase());
  const playable = ['video/vp8', 'video/h264'].filter((m) => codecs.includes(m));
  if (!playable.length) return { ok: false, detail: 'cannot decode VP8 or H.264 video' };
  return { ok: true, detail: `WebRTC, ${playable.map((m) => m.slice(6).toUpperCase()).join(' and ')}` };
}

/**
 * @param {Info} info
 * @param {{browser: boolean, direct: PathResult, turn: Record<string, PathResult>}} paths
 * @param {string} via  which path the speed was measured on ('' if none)
 * @param {number|null} kbps
 */
function verdict(info, paths, via, kbps) {
  const { min, good } = info.video_kbps;
  const mbps = (/** @type {number} */ k) => `${(k / 1000).toFixed(1)} Mbit/s`;
  if (!paths.browser) {
    return { verdict: 'unsupported', title: 'This browser cannot show the live video',
      text: 'Open the invite in a current Chrome, Edge, Firefox or Safari.' };
  }
  if (!via) {
    return { verdict: 'blocked', title: 'Your network blocks the live video',
      text: 'This computer could not receive video from ScrubIn, directly or through its relay '
        + 'server. Send the note below to your IT department: it says what to allow. You can '
        + 'check again once they have.' };
  }
  const how = via === 'direct' ? 'directly from the ScrubIn server'
    : TRANSPORT_WORDS[/** @type {'udp'|'tcp'|'tls'} */ (via.slice(5))];
  if (kbps !== null && kbps < min) {
    return { verdict: 'slow', title: 'Video will probably stutter',
      text: `Video gets through (${how}), but only at ${mbps(kbps)}; the session's video needs `
        + `at least ${mbps(min)} and looks best at ${mbps(good)}. A wired connection or a less `
        + 'busy network helps.' };
  }
  const speed = kbps === null ? '' : kbps < good
    ? ` At ${mbps(kbps)} the picture may be a little softer than at full quality (${mbps(good)}).`
    : '';
  const relayed = via === 'direct' ? ''
    : ' Your network blocks the direct way, but the relay server gets the video through.';
  return { verdict: 'ready', title: 'You are ready for the session',
    text: `This computer can receive the live video ${how}.${relayed}${speed}` };
}

/**
 * @param {Info} info
 * @param {{browser: boolean, direct: PathResult, turn: Record<string, PathResult>}} paths
 */
function itNote(info, paths) {
  const host = location.host;
  const lines = [
    'ScrubIn (live surgical teaching over WebRTC) from this computer:',
    '',
    `Web page and signalling: ${location.origin} (works: this check ran from it).`,
    '',
    'Live video needs ONE of:',
    `1. Direct: UDP from the ScrubIn server to this computer, replies to traffic it sends to ${host}`
      + ` (the server's media addresses: ${paths.direct.remote.join(', ') || 'see your ScrubIn admin'}).`,
    `   Result here: ${paths.direct.ok ? 'works' : 'blocked'}.`,
  ];
  if (info.turn.length) {
    lines.push('2. The TURN relay server (RFC 8656), any one of:');
    for (const turn of info.turn) {
      const result = paths.turn[turn.transport];
      lines.push(`   ${turn.url}  →  ${result ? (result.ok ? 'works' : 'blocked') : 'not checked'}`);
    }
    lines.push('   TLS on port 443 passes most firewalls; web proxies must allow it without '
      + 'inspecting it (it carries WebRTC, not HTTP).');
  } else {
    lines.push('2. (This ScrubIn server offers no TURN relay: ask its admin to set one up.)');
  }
  lines.push('', 'The media is encrypted end to end between this browser and ScrubIn (DTLS-SRTP).');
  return lines.join('\n');
}

/** @param {string} token @param {Info} info */
async function run(token, info) {
  state.state = 'checking';
  $('#pf-again').hidden = true;
  const verdictCard = $('#pf-verdict');
  verdictCard.dataset.verdict = 'checking';
  $('#pf-verdict-title').textContent = 'Checking your connection…';

  const browser = browserCheck();
  setStep('browser', browser.ok ? 'ok' : 'failed', browser.detail);
  /** @type {{browser: boolean, direct: PathResult, turn: Record<string, PathResult>}} */
  const paths = { browser: browser.ok, direct: { ok: false, detail: 'not checked', pc: null,
    channel: null, rttMs: null, remote: [] }, turn: {} };
  let via = '';
  let kbps = null;
  if (browser.ok) {
    setStep('direct', 'running');
    const turns = [...info.turn].sort((a, b) => TRANSPORT_ORDER.indexOf(a.transport)
      - TRANSPORT_ORDER.indexOf(b.transport));
    for (const turn of turns) setStep(`turn-${turn.transport}`, 'running');
    const servers = info.ice_servers.filter((s) => ![s.urls].flat()
      .some((u) => /^turns?:/.test(u)));
    const credentials = info.ice_servers.find((s) => [s.urls].flat().some((u) => /^turns?:/.test(u)));
    const [direct, ...relayed] = await Promise.all([
      checkPath(token, info.session.id, servers, 'all'),
      ...turns.map((turn) => checkPath(token, info.session.id, [{ urls: [turn.url],
        username: credentials?.username, credential: credentials?.credential }], 'relay')),
    ]);
    paths.direct = direct;
    setStep('direct', direct.ok ? 'ok' : 'failed', direct.detail);
    turns.forEach((turn, i) => {
      paths.turn[turn.transport] = relayed[i];
      setStep(`turn-${turn.transport}`, relayed[i].ok ? 'ok' : 'failed', relayed[i].detail);
    });
    const best = direct.ok ? direct : relayed.find((r) => r.ok);
    if (best) {
      via = best === direct ? 'direct' : `turn-${turns[relayed.indexOf(best)].transport}`;
      setStep('speed', 'running');
      const measured = best.channel
        ? await download(best.channel, info.download.bytes, info.download.seconds) : null;
      kbps = measured ? measured.kbps : null;
      const { min, good } = info.video_kbps;
      setStep('speed', kbps === null ? 'warn' : kbps < min ? 'failed' : kbps < good ? 'warn' : 'ok',
        kbps === null ? 'could not be measured' : `${(kbps / 1000).toFixed(1)} Mbit/s`);
    } else {
      setStep('speed', 'skipped', 'nothing got through');
    }
    for (const result of [direct, ...relayed]) result.pc?.close();
  } else {
    for (const row of document.querySelectorAll('[data-state="pending"]')) {
      /** @type {HTMLElement} */ (row).dataset.state = 'skipped';
    }
  }

  const outcome = verdict(info, paths, via, kbps);
  verdictCard.dataset.verdict = outcome.verdict;
  $('#pf-verdict-title').textContent = outcome.title;
  $('#pf-verdict-text').textContent = outcome.text;
  const note = itNote(info, paths);
  /** @type {HTMLTextAreaElement} */ ($('#pf-it-text')).value = note;
  $('#pf-it').hidden = outcome.verdict === 'ready' && via === 'direct';
  $('#pf-again').hidden = false;
  state.result = {
    verdict: outcome.verdict, via, kbps, browser: browser.ok, direct: paths.direct.ok,
    turn: Object.fromEntries(Object.entries(paths.turn).map(([t, r]) => [t, r.ok])), note,
  };
  state.state = 'done';
}

async function main() {
  const token = takeToken();
  const fail = (/** @type {string} */ title, /** @type {string} */ text) => {
    $('#pf-verdict').dataset.verdict = 'error';
    $('#pf-verdict-title').textContent = title;
    $('#pf-verdict-text').textContent = text;
    state.state = 'error';
  };
  if (!token) {
    fail('No invite', 'Open the connection check from your invite (the link ends with #token=…).');
    return;
  }
  const sessionId = String(tokenClaims(token).sid || '');
  const proceed = /** @type {HTMLAnchorElement} */ ($('#pf-continue'));
  proceed.href = `join.html#token=${token}`;
  proceed.hidden = false;
  /** @type {Info} */
  let info;
  try {
    const response = await api(token, `/api/sessions/${encodeURIComponent(sessionId)}/preflight`);
    info = await response.json();
  } catch (err) {
    fail('Cannot check with this link', err instanceof CheckError ? joinFailure(err.body)
      : 'The ScrubIn server cannot be reached. Check the network and open the link again.');
    return;
  }
  $('#pf-session').textContent = `For: ${info.session.title}`;
  const turns = [...info.turn].sort((a, b) => TRANSPORT_ORDER.indexOf(a.transport)
    - TRANSPORT_ORDER.indexOf(b.transport));
  for (const turn of turns) addStep(`turn-${turn.transport}`, `Video ${TRANSPORT_WORDS[turn.transport]}`);
  $('#pf-again').addEventListener('click', () => {
    for (const row of document.querySelectorAll('#pf-steps li')) {
      /** @type {HTMLElement} */ (row).dataset.state = 'pending';
      $('.pf-detail', /** @type {HTMLElement} */ (row)).textContent = '';
    }
    run(token, info).catch(onError);
  });
  $('#pf-copy').addEventListener('click', async () => {
    const text = /** @type {HTMLTextAreaElement} */ ($('#pf-it-text'));
    try {
      await navigator.clipboard.writeText(text.value);
    } catch {
      text.select(); // the person copies it by hand
    }
  });
  /** @param {unknown} err */
  function onError(err) {
    fail('The check could not finish', err instanceof CheckError ? joinFailure(err.body)
      : String(err));
    $('#pf-again').hidden = false;
  }
  await run(token, info).catch(onError);
}

main();

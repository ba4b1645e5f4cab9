// @ts-check
/**
 * Telestration: drawings over a video Feed, at the same place on the picture
 * whatever the size or shape of the element showing it.
 *
 * Coordinates on the wire are normalised to the video's *content rectangle*:
 * the part of the element where the picture is, letterboxing excluded
 * (`object-fit: contain`), or the visible crop (`cover`). (0, 0) is the
 * picture's top-left corner, (1, 1) its bottom-right. Sizes (line width, text)
 * are relative to a 720-line picture, so a drawing keeps its proportions.
 *
 * Rendering uses timers, not requestAnimationFrame: a trainee's page may be in
 * the background (a second monitor, a test) and must still show drawings.
 */

/** @typedef {import('./protocol.js').Shape} Shape */
/** @typedef {import('./protocol.js').LiveAnnotation} LiveAnnotation */

import { nowMs } from './protocol.js';

/** Drawings fade out over their last second. */
export const FADE_TAIL_MS = 1000;
/** Sizes are given for a picture this many pixels high. */
const REFERENCE_HEIGHT = 720;
/** Freehand points closer than this (normalised) to the previous one are skipped. */
const MIN_STEP = 0.002;

/**
 * Where the picture is inside an element of `boxWidth`×`boxHeight` showing a
 * `videoWidth`×`videoHeight` video with `fit` (CSS object-fit), centred
 * (object-position 50% 50%, the default).
 * @param {number} boxWidth @param {number} boxHeight
 * @param {number} videoWidth @param {number} videoHeight
 * @param {string} [fit]
 * @returns {{x: number, y: number, width: number, height: number}|null}
 */
export function fitRect(boxWidth, boxHeight, videoWidth, videoHeight, fit = 'contain') {
  if (!(boxWidth > 0 && boxHeight > 0 && videoWidth > 0 && videoHeight > 0)) return null;
  let width = boxWidth;
  let height = boxHeight;
  if (fit === 'contain' || fit === 'scale-down' || fit === 'cover') {
    const scale = fit === 'cover'
      ? Math.max(boxWidth / videoWidth, boxHeight / videoHeight)
      : Math.min(boxWidth / videoWidth, boxHeight / videoHeight,
        fit === 'scale-down' ? 1 : Infinity);
    width = videoWidth * scale;
    height = videoHeight * scale;
  } else if (fit === 'none') {
    width = videoWidth;
    height = videoHeight;
  }
  return { x: (boxWidth - width) / 2, y: (boxHeight - height) / 2, width, height };
}

/**
 * The content rectangle of a <video>, in CSS pixels relative to its box.
 * @param {HTMLVideoElement} video
 */
export function contentRect(video) {
  return fitRect(video.clientWidth, video.clientHeight, video.videoWidth, video.videoHeight,
    getComputedStyle(video).objectFit || 'fill');
}

/**
 * Draw one shape. `rect` is the content rectangle in canvas units.
 * @param {CanvasRenderingContext2D} ctx
 * @param {Shape} shape
 * @param {{x: number, y: number, width: number, height: number}} rect
 * @param {number} alpha
 */
export function drawShape(ctx, shape, rect, alpha) {
  const scale = rect.height / REFERENCE_HEIGHT;
  const at = (/** @type {[number, number]} */ p) => [rect.x + p[0] * rect.width,
    rect.y + p[1] * rect.height];
  const pts = shape.points.map(at);
  const width = Math.max(1.5, shape.width * scale);
  ctx.save();
  ctx.globalAlpha = alpha;
  ctx.lineCap = 'round';
  ctx.lineJoin = 'round';
  ctx.strokeStyle = shape.color;
  ctx.fillStyle = shape.color;
  ctx.lineWidth = width;
  ctx.beginPath();
  if (shape.kind === 'freehand') {
    if (pts.length === 1) {
      ctx.arc(pts[0][0], pts[0][1], width / 2, 0, 2 * Math.PI);
      ctx.fill();
    } else {
      ctx.moveTo(pts[0][0], pts[0][1]);
      for (const [x, y] of pts.slice(1)) ctx.lineTo(x, y);
      ctx.stroke();
    }
  } else if (shape.kind === 'arrow') {
    const [[x0, y0], [x1, y1]] = pts;
    const angle = Math.atan2(y1 - y0, x1 - x0);
    const head = Math.max(10, width * 4);
    ctx.moveTo(x0, y0);
    ctx.lineTo(x1, y1);
    for (const side of [-1, 1]) {
      ctx.moveTo(x1, y1);
      ctx.lineTo(x1 - head * Math.cos(angle + side * 0.45), y1 - head * Math.sin(angle + side * 0.45));
    }
    ctx.stroke();
  } else if (shape.kind === 'circle') {
    const [[cx, cy], [ex, ey]] = pts;
    ctx.arc(cx, cy, Math.hypot(ex - cx, ey - cy), 0, 2 * Math.PI);
    ctx.stroke();
  } else if (shape.kind === 'label') {
    const size = Math.max(11, 26 * scale);
    ctx.font = `600 ${size}px system-ui, sans-serif`;
    ctx.textBaseline = 'middle';
    const text = String(shape.text || '');
    const pad = size * 0.3;
    const [x, y] = pts[0];
    const w = ctx.measureText(text).width;
    ctx.globalAlpha = alpha * 0.65;
    ctx.fillStyle = '#000';
    ctx.fillRect(x - pad, y - size / 2 - pad, w + 2 * pad, size + 2 * pad);
    ctx.globalAlpha = alpha;
    ctx.fillStyle = shape.color;
    ctx.fillText(text, x, y); // canvas text: never markup
  }
  ctx.restore();
}

/**
 * A canvas laid exactly over a <video>, showing the drawings of one Feed.
 */
export class TelestrationOverlay {
  /**
   * @param {HTMLVideoElement} video
   * @param {HTMLCanvasElement} canvas  a sibling of the video in a positioned parent
   */
  constructor(video, canvas) {
    this.video = video;
    this.canvas = canvas;
    /** @type {string|null} */
    this.feed = null;
    /** @type {LiveAnnotation[]} */
    this.annotations = [];
    /** @type {Shape|null} the shape being drawn here (not sent yet) */
    this.draft = null;
    /** @type {Map<string, number>} annotation id → when it was first drawn (nowMs) */
    this.drawnAt = new Map();
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this._timer = undefined;
    const redraw = () => this.render();
    new ResizeObserver(redraw).observe(video);
    for (const type of ['resize', 'loadedmetadata']) video.addEventListener(type, redraw);
    window.addEventListener('resize', redraw);
  }

  /**
   * Show these drawings (those of other Feeds are ignored).
   * @param {string|null} feed
   * @param {Iterable<LiveAnnotation>} annotations
   */
  show(feed, annotations) {
    this.feed = feed;
    this.annotations = [...annotations].filter((a) => a.annotation.feed === feed);
    this.render();
  }

  /** @param {Shape|null} shape */
  setDraft(shape) {
    this.draft = shape;
    this.render();
  }

  /** Where the picture is, in CSS pixels relative to the canvas. */
  rect() {
    const r = contentRect(this.video);
    if (!r) return null;
    return { ...r, x: r.x + this.video.offsetLeft - this.canvas.offsetLeft,
      y: r.y + this.video.offsetTop - this.canvas.offsetTop };
  }

  /**
   * A pointer position as normalised picture coordinates, clamped to the picture.
   * @param {number} clientX @param {number} clientY
   * @returns {[number, number]|null}
   */
  toPicture(clientX, clientY) {
    const r = this.rect();
    if (!r) return null;
    const box = this.canvas.getBoundingClientRect();
    const clamp = (/** @type {number} */ v) => Math.min(1, Math.max(0, v));
    return [clamp((clientX - box.left - r.x) / r.width), clamp((clientY - box.top - r.y) / r.height)];
  }

  render() {
    clearTimeout(this._timer);
    this._timer = undefined;
    const canvas = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const cssWidth = canvas.clientWidth;
    const cssHeight = canvas.clientHeight;
    const width = Math.round(cssWidth * dpr);
    const height = Math.round(cssHeight * dpr);
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    const ctx = /** @type {CanvasRenderingContext2D} */ (canvas.getContext('2d'));
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const r = this.rect();
    if (!r) return;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const now = nowMs();
    let wake = Infinity;
    for (const live of this.annotations) {
      let alpha = 1;
      if (live.expiresAt !== null) {
        const left = live.expiresAt - now;
        if (left <= 0) continue;
        alpha = Math.min(1, left / FADE_TAIL_MS);
        // Wake up when the fade starts, then often while it runs.
        wake = Math.min(wake, left > FADE_TAIL_MS ? left - FADE_TAIL_MS : 60);
      }
      drawShape(ctx, live.annotation.shape, r, alpha);
      if (!this.drawnAt.has(live.annotation.id)) this.drawnAt.set(live.annotation.id, now);
    }
    if (this.draft) drawShape(ctx, this.draft, r, 0.85);
    if (wake < Infinity) this._timer = setTimeout(() => this.render(), wake);
  }
}

/**
 * Pointer input on an overlay: freehand, arrow, circle, label.
 */
export class DrawingPad {
  /**
   * @param {TelestrationOverlay} overlay
   * @param {{tool: () => {kind: Shape['kind'], color: string, width: number, text: string},
   *          maxPoints: () => number, onShape: (shape: Shape) => void,
   *          onEmptyLabel?: () => void}} options
   */
  constructor(overlay, options) {
    this.overlay = overlay;
    this.options = options;
    this.enabled = false;
    /** @type {Shape|null} */
    this.shape = null;
    /** @type {number|null} */
    this.pointer = null;
    const canvas = overlay.canvas;
    canvas.addEventListener('pointerdown', (e) => this._down(e));
    canvas.addEventListener('pointermove', (e) => this._move(e));
    canvas.addEventListener('pointerup', (e) => this._up(e));
    canvas.addEventListener('pointercancel', () => this._cancel());
  }

  /** @param {boolean} on */
  enable(on) {
    this.enabled = on;
    this.overlay.canvas.classList.toggle('drawing', on);
    if (!on) this._cancel();
  }

  /** @param {PointerEvent} e */
  _down(e) {
    if (!this.enabled || e.button !== 0) return;
    const p = this.overlay.toPicture(e.clientX, e.clientY);
    if (!p) return;
    e.preventDefault();
    const tool = this.options.tool();
    if (tool.kind === 'label') {
      const text = tool.text.trim();
      if (text) this.options.onShape({ kind: 'label', color: tool.color, width: tool.width, points: [p], text });
      else this.options.onEmptyLabel?.();
      return;
    }
    this.pointer = e.pointerId;
    this.overlay.canvas.setPointerCapture(e.pointerId);
    const points = tool.kind === 'freehand' ? [p] : [p, p];
    this.shape = { kind: tool.kind, color: tool.color, width: tool.width, points };
    this.overlay.setDraft(this.shape);
  }

  /** @param {PointerEvent} e */
  _move(e) {
    if (!this.shape || e.pointerId !== this.pointer) return;
    const p = this.overlay.toPicture(e.clientX, e.clientY);
    if (!p) return;
    const points = this.shape.points;
    if (this.shape.kind === 'freehand') {
      const last = points[points.length - 1];
      if (Math.hypot(p[0] - last[0], p[1] - last[1]) < MIN_STEP) return;
      points.push(p);
    } else {
      points[1] = p;
    }
    this.overlay.setDraft(this.shape);
  }

  /** @param {PointerEvent} e */
  _up(e) {
    if (!this.shape || e.pointerId !== this.pointer) return;
    this._move(e);
    const shape = this.shape;
    this._cancel();
    const [a, b] = [shape.points[0], shape.points[shape.points.length - 1]];
    const tiny = shape.kind !== 'freehand' && Math.hypot(b[0] - a[0], b[1] - a[1]) < 0.005;
    if (tiny) return;
    shape.points = thin(shape.points, this.options.maxPoints());
    shape.points = shape.points.map(([x, y]) => [round(x), round(y)]);
    this.options.onShape(shape);
  }

  _cancel() {
    if (this.pointer !== null && this.overlay.canvas.hasPointerCapture(this.pointer)) {
      this.overlay.canvas.releasePointerCapture(this.pointer);
    }
    this.pointer = null;
    this.shape = null;
    this.overlay.setDraft(null);
  }
}

/** @param {number} v */
function round(v) {
  return Math.round(v * 10000) / 10000;
}

/**
 * At most `max` points, keeping the first and the last.
 * @param {[number, number][]} points @param {number} max
 */
export function thin(points, max) {
  if (points.length <= max) return points;
  const out = [];
  const step = (points.length - 1) / (max - 1);
  for (let i = 0; i < max; i++) out.push(points[Math.round(i * step)]);
  return out;
}

/**
 * The timing of the frame a <video> shows, for drawings made on it
 * (requestVideoFrameCallback; foreground pages only, else only the clock).
 */
export class FrameClock {
  /** @param {HTMLVideoElement} video */
  constructor(video) {
    this.video = video;
    /** @type {VideoFrameCallbackMetadata|null} */
    this.last = null;
    this._running = false;
  }

  start() {
    if (this._running || !('requestVideoFrameCallback' in HTMLVideoElement.prototype)) return;
    this._running = true;
    const tick = (/** @type {number} */ _now, /** @type {VideoFrameCallbackMetadata} */ meta) => {
      this.last = meta;
      if (this._running) this.video.requestVideoFrameCallback(tick);
    };
    this.video.requestVideoFrameCallback(tick);
  }

  stop() {
    this._running = false;
    this.last = null;
  }

  /** @returns {Record<string, number>} */
  media() {
    /** @type {Record<string, number>} */
    const out = { client_time: nowMs() };
    const meta = /** @type {any} */ (this.last);
    if (!meta) return out;
    const pick = /** @type {const} */ ([['mediaTime', 'media_time'], ['rtpTimestamp', 'rtp_timestamp'],
      ['captureTime', 'capture_time'], ['presentedFrames', 'presented_frames'],
      ['expectedDisplayTime', 'expected_display_time']]);
    for (const [from, to] of pick) {
      if (typeof meta[from] === 'number' && Number.isFinite(meta[from])) out[to] = meta[from];
    }
    return out;
  }
}

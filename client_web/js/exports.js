// @ts-check
/**
 * De-identified exports as the library and the player show them: their
 * states, their progress, their API paths (docs/protocol.md, "De-identified
 * exports").
 */

import { formatDuration } from './review.js';

export const EXPORT_STATE_LABELS = /** @type {Record<string, string>} */ ({
  queued: 'Waiting to start',
  running: 'De-identifying…',
  pending_review: 'Pending review',
  signed_off: 'Signed off',
  rejected: 'Rejected',
  failed: 'Failed',
});

/** States in which the export is still being made (the library polls). */
export const UNFINISHED = new Set(['queued', 'running']);

/**
 * "42% · about 1:10 left" of a running export.
 * @param {any} item
 */
export function describeProgress(item) {
  const progress = item.progress;
  if (!progress) return item.state === 'queued' ? 'Waiting for the exports before it' : '';
  const percent = Math.floor((Number(progress.fraction) || 0) * 100);
  const eta = progress.eta_s === null || progress.eta_s === undefined
    ? '' : ` · about ${formatDuration(Math.ceil(Number(progress.eta_s)))} left`;
  return `${percent}%${eta}`;
}

/** What an export hides and keeps, in words. @param {any} item */
export function describeOptions(item) {
  const options = item.options || {};
  return [
    `${(item.feeds || []).length} camera${(item.feeds || []).length === 1 ? '' : 's'}`,
    options.conservative ? 'conservative blur' : 'faces blurred',
    options.narration ? 'narration kept' : 'no sound',
    options.drawings ? 'drawings' : '',
  ].filter(Boolean).join(' · ');
}

/** @param {string} recordingId @param {string} exportId */
export function exportPath(recordingId, exportId) {
  return `/api/recordings/${encodeURIComponent(recordingId)}/exports/${encodeURIComponent(exportId)}`;
}

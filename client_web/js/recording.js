// @ts-check
/**
 * Recording on the live pages (docs/protocol.md, "Recording"): a REC
 * indicator every participant sees, and for the expert and admins a Record
 * button that asks for the consent record before anything is recorded.
 *
 * Built here from the page's `.topbar-actions`, so a page only calls
 * `mountRecording(client)`. Everything shown is text (textContent).
 */

import { $, describeError, el } from './ui.js';

/** @typedef {{type?: string, state: 'on'|'off'|'failed', since: number|null,
 *   error?: {code: string, message: string, feed?: string|null}}} RecordingStatus */

/** Consent scopes, as the server knows them; `live_only` means: do not record. */
export const SCOPES = /** @type {const} */ ([
  ['internal_review', 'Internal review', 'The team and this session\'s reviewers may watch it.'],
  ['deidentified_reuse', 'De-identified reuse', 'May be used for teaching beyond this session.'],
  ['live_only', 'Live teaching only', 'The patient agreed to live teaching, not to a recording.'],
]);
const MODERATOR_ROLES = new Set(['expert', 'admin']);

/** @param {RecordingStatus} status */
export function recordingLabel(status) {
  if (status.state === 'on' && status.error) {
    return `REC · ${status.error.feed ? `${status.error.feed}: ` : ''}${status.error.message}`;
  }
  if (status.state === 'on') return 'REC';
  if (status.state === 'failed') {
    return `Recording failed${status.error ? `: ${status.error.message}` : ''}`;
  }
  return '';
}

/** Local date and time for a datetime-local input (now). */
function localNow() {
  const now = new Date();
  now.setMinutes(now.getMinutes() - now.getTimezoneOffset());
  return now.toISOString().slice(0, 16);
}

/**
 * @param {import('./protocol.js').ScrubinClient} client
 * @param {{root?: ParentNode}} [options]
 */
export function mountRecording(client, { root = document } = {}) {
  const actions = $('.topbar-actions', root);
  const text = el('span', { class: 'rec-text' });
  const indicator = el('span', { class: 'rec-indicator', 'data-state': 'off', role: 'status',
    'aria-live': 'polite', hidden: true }, el('span', { class: 'rec-dot', 'aria-hidden': 'true' }),
  text);
  actions.prepend(indicator);
  /** @type {RecordingStatus} */
  let status = { state: 'off', since: null };
  /** @type {HTMLButtonElement|null} */
  let toggle = null;
  /** @type {ReturnType<typeof consentDialog>|null} */
  let dialog = null;
  let busy = false;

  const render = () => {
    indicator.dataset.state = status.state;
    indicator.hidden = status.state === 'off';
    text.textContent = recordingLabel(status);
    indicator.title = status.state === 'on' ? 'This session is being recorded' : text.textContent;
    if (toggle) {
      const on = status.state === 'on';
      toggle.textContent = on ? 'Stop recording' : 'Record';
      toggle.setAttribute('aria-pressed', String(on));
      toggle.disabled = busy || client.state !== 'open';
    }
  };

  /** @param {RecordingStatus|undefined|null} next */
  const update = (next) => {
    status = next && next.state ? next : { state: 'off', since: null };
    render();
  };

  const setUpControls = () => {
    if (toggle || !MODERATOR_ROLES.has(client.participant?.role || '')) return;
    toggle = /** @type {HTMLButtonElement} */ (el('button', { class: 'btn rec-toggle',
      type: 'button', 'aria-pressed': 'false', id: 'rec-toggle' }, 'Record'));
    const end = actions.querySelector('#end-session');
    if (end) actions.insertBefore(toggle, end);
    else actions.append(toggle);
    dialog = consentDialog(client.participant?.name || '');
    toggle.addEventListener('click', async () => {
      if (!dialog || !toggle) return;
      if (status.state === 'on') {
        busy = true;
        render();
        try {
          await client.request({ type: 'stop_recording' });
        } catch (err) {
          text.textContent = describeError(/** @type {any} */ (err));
        } finally {
          busy = false;
          render();
        }
        return;
      }
      dialog.open(async (consent) => {
        const reply = await client.request({ type: 'start_recording', consent });
        update(reply.recording);
      });
    });
  };

  client.addEventListener('welcome', (e) => {
    const { welcome } = /** @type {CustomEvent} */ (e).detail;
    setUpControls();
    update(welcome.recording);
  });
  client.addEventListener('recording', (e) => update(/** @type {CustomEvent} */ (e).detail.recording));
  client.addEventListener('state', () => render());
  client.addEventListener('session_ended', () => update(null));
  return { status: () => status };
}

/**
 * The consent dialog: who recorded the consent, when, its scope, a note.
 * @param {string} name  default for "recorded by"
 */
function consentDialog(name) {
  const form = /** @type {HTMLFormElement} */ (el('form', { class: 'consent-form', method: 'dialog' }));
  const by = /** @type {HTMLInputElement} */ (el('input', { class: 'input', id: 'consent-by', required: true,
    maxlength: 200, autocomplete: 'name', value: name }));
  const at = /** @type {HTMLInputElement} */ (el('input', { class: 'input', id: 'consent-at', type: 'datetime-local',
    required: true }));
  const note = /** @type {HTMLTextAreaElement} */ (el('textarea', { class: 'input consent-note', id: 'consent-note',
    maxlength: 1000, rows: 2, placeholder: 'Reference of the consent form, limits agreed…' }));
  const scopes = el('fieldset', { class: 'consent-scopes' }, el('legend', {}, 'What the patient agreed to'));
  for (const [value, label, hint] of SCOPES) {
    scopes.append(el('label', { class: 'consent-scope' },
      el('input', { type: 'radio', name: 'scope', value, required: true }),
      el('span', {}, el('strong', {}, label), el('span', { class: 'muted' }, ` ${hint}`))));
  }
  const error = el('p', { class: 'consent-error', role: 'alert', hidden: true });
  const cancel = el('button', { class: 'btn', type: 'button', value: 'cancel' }, 'Cancel');
  const submit = /** @type {HTMLButtonElement} */ (el('button', { class: 'btn danger', type: 'submit',
    id: 'consent-start' }, 'Start recording'));
  form.append(
    el('h2', { id: 'consent-title' }, 'Record this session?'),
    el('p', { class: 'muted' }, 'Nothing is recorded without the patient\'s consent. Record it here; it stays with the recording and limits who may review it.'),
    el('label', { class: 'field' }, el('span', {}, 'Consent recorded by'), by),
    el('label', { class: 'field' }, el('span', {}, 'Consent recorded on'), at),
    scopes,
    el('label', { class: 'field' }, el('span', {}, 'Note (optional)'), note),
    error,
    el('div', { class: 'dialog-actions' }, cancel, submit));
  const dialog = /** @type {HTMLDialogElement} */ (el('dialog', { class: 'dialog consent-dialog',
    id: 'consent-dialog', 'aria-labelledby': 'consent-title' }, form));
  document.body.append(dialog);
  cancel.addEventListener('click', () => dialog.close('cancel'));

  /** @type {((consent: Record<string, string>) => Promise<void>)|null} */
  let onConsent = null;
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const scope = /** @type {HTMLInputElement|null} */ (form.querySelector('input[name="scope"]:checked'));
    if (!onConsent || !scope) return;
    error.hidden = true;
    if (scope.value === 'live_only') {
      error.textContent = 'The consent covers live teaching only: this session may not be recorded.';
      error.hidden = false;
      return;
    }
    /** @type {Record<string, string>} */
    const consent = { recorded_by: by.value.trim(), recorded_at: new Date(at.value).toISOString(),
      scope: scope.value };
    if (note.value.trim()) consent.note = note.value.trim();
    submit.disabled = true;
    try {
      await onConsent(consent);
      dialog.close('confirm');
    } catch (err) {
      error.textContent = describeError(/** @type {any} */ (err));
      error.hidden = false;
    } finally {
      submit.disabled = false;
    }
  });

  return {
    dialog,
    /** @param {(consent: Record<string, string>) => Promise<void>} then */
    open(then) {
      onConsent = then;
      error.hidden = true;
      at.value = localNow();
      for (const radio of form.querySelectorAll('input[name="scope"]')) {
        /** @type {HTMLInputElement} */ (radio).checked = false;
      }
      note.value = '';
      dialog.showModal();
    },
  };
}

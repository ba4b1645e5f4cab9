// @ts-check
/**
 * Small DOM helpers shared by the pages. Everything that comes from the
 * server or a user (names, titles, messages) goes in as text, never markup.
 */

/**
 * @template {Element} [T=HTMLElement]
 * @param {string} selector
 * @param {ParentNode} [root]
 * @returns {T}
 */
export function $(selector, root = document) {
  const found = root.querySelector(selector);
  if (!found) throw new Error(`missing element ${selector}`);
  return /** @type {T} */ (found);
}

/**
 * Create an element with attributes and text/element children.
 * @param {string} tag
 * @param {Record<string, string|boolean|number|undefined|null>} [attrs]  `class`, `data-*`, aria…
 * @param {...(Node|string|null|undefined|false)} children  strings become text nodes
 * @returns {HTMLElement}
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === 'string' ? document.createTextNode(child) : child);
  }
  return node;
}

/** Clone the first element of a <template>. */
export function fromTemplate(/** @type {string} */ id) {
  const template = /** @type {HTMLTemplateElement} */ ($(`#${id}`));
  return /** @type {HTMLElement} */ (
    /** @type {HTMLElement} */ (template.content.firstElementChild).cloneNode(true));
}

/** Human labels for the client's connection states. */
export const CONNECTION_LABELS = {
  idle: 'Not connected',
  connecting: 'Connecting…',
  open: 'Connected',
  reconnecting: 'Reconnecting…',
  ended: 'Session ended',
  failed: 'Cannot connect',
  closed: 'Disconnected',
};

/**
 * Show the client's connection state in a status pill.
 * @param {HTMLElement} pill
 * @param {keyof typeof CONNECTION_LABELS} state
 */
export function showConnection(pill, state) {
  pill.dataset.state = state;
  pill.textContent = CONNECTION_LABELS[state] || state;
}

/** A dismissible error banner at the top of the page (role=alert). */
export class Banner {
  /** @param {HTMLElement} root */
  constructor(root) {
    this.root = root;
    this.text = $('.banner-text', root);
    this.timer = undefined;
    $('.banner-close', root).addEventListener('click', () => this.hide());
  }

  /**
   * @param {string} message
   * @param {{level?: 'error'|'info', sticky?: boolean}} [options]
   */
  show(message, { level = 'error', sticky = false } = {}) {
    this.text.textContent = message;
    this.root.dataset.level = level;
    this.root.hidden = false;
    clearTimeout(this.timer);
    if (!sticky) this.timer = setTimeout(() => this.hide(), 12000);
  }

  hide() {
    clearTimeout(this.timer);
    this.root.hidden = true;
  }
}

/**
 * A readable sentence for an error object from the protocol.
 * @param {{code?: string, message?: string, fault?: string}} error
 */
export function describeError(error) {
  const message = error.message || error.code || 'Something went wrong';
  switch (error.fault) {
    case 'server':
      return `${message} (server problem, retrying may help)`;
    case 'protocol':
      return `${message} (client error: please report it)`;
    default:
      return message;
  }
}

/**
 * Why a page could not join, in words for a surgeon or trainee.
 * @param {{code?: string, message?: string, fault?: string}} error
 */
export function joinFailure(error) {
  switch (error.code) {
    case 'token_expired':
      return 'This link has expired. Ask the organiser for a new one.';
    case 'token_invalid':
    case 'token_missing':
      return 'This link is not valid. Check that you opened the whole link, or ask for a new one.';
    case 'unknown_session':
      return 'This session is not on this server (it may have finished). Ask the organiser.';
    case 'wrong_session':
      return 'This link belongs to another session.';
    case 'wrong_role':
    case 'not_allowed':
      return `This link does not give access to the live session (${error.message || error.code}).`;
    case 'session_ended':
      return 'This session has ended.';
    default:
      return describeError(error);
  }
}

/**
 * Attach a stream to a media element and start it; playback failures are
 * returned, not thrown, so they never surface as unhandled rejections.
 * @param {HTMLMediaElement} media
 * @param {MediaStream|null} stream
 * @returns {Promise<Error|null>}
 */
export async function attachStream(media, stream) {
  if (media.srcObject !== stream) media.srcObject = stream;
  if (!stream) return null;
  try {
    await media.play();
    return null;
  } catch (err) {
    return /** @type {Error} */ (err);
  }
}

/** A human name for a slot id: `endoscope` → `Endoscope`. */
export function slotTitle(/** @type {string} */ slot) {
  const words = slot.replace(/[-_]+/g, ' ');
  return words.charAt(0).toUpperCase() + words.slice(1);
}

/**
 * Ask for confirmation in a <dialog> (no window.confirm: it blocks the page
 * and its media on some tablets).
 * @param {HTMLDialogElement} dialog  with buttons value="cancel" / value="confirm"
 * @returns {Promise<boolean>}
 */
export function confirmDialog(dialog) {
  return new Promise((resolve) => {
    const onClose = () => {
      dialog.removeEventListener('close', onClose);
      resolve(dialog.returnValue === 'confirm');
    };
    dialog.returnValue = '';
    dialog.addEventListener('close', onClose);
    dialog.showModal();
  });
}

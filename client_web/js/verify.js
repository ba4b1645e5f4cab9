/**
 * The public verification page (`/verify.html#id=…`): asks the server whether
 * a certificate of attendance with this verification id exists, and shows
 * exactly what it certifies. No token: anyone holding a certificate may check it.
 */

/** @typedef {{id: string, name: string, title: string, procedure: string, expert: string,
 *             date: string, minutes: number}} Certificate */

/** @param {string} selector @returns {HTMLElement} */
function $(selector) {
  const el = document.querySelector(selector);
  if (!(el instanceof HTMLElement)) throw new Error(`missing ${selector}`);
  return el;
}

const LABELS = /** @type {const} */ ([
  ['name', 'Name'], ['title', 'Session'], ['procedure', 'Procedure'], ['expert', 'Expert'],
  ['date', 'Date'], ['minutes', 'Minutes attended'], ['id', 'Verification id'],
]);

/** @param {string} verdict @param {Certificate | null} certificate */
function show(verdict, certificate) {
  $('#verify-result').hidden = false;
  $('#verify-verdict').textContent = verdict;
  const fields = $('#verify-fields');
  fields.replaceChildren();
  const pdf = /** @type {HTMLAnchorElement} */ ($('#verify-pdf'));
  pdf.hidden = !certificate;
  if (!certificate) {
    pdf.removeAttribute('href');
    return;
  }
  pdf.href = `/api/verify/${certificate.id}/pdf`;
  for (const [key, label] of LABELS) {
    const dt = document.createElement('dt');
    dt.textContent = label;
    const dd = document.createElement('dd');
    dd.textContent = String(certificate[key] ?? '');
    fields.append(dt, dd);
  }
}

/** @param {string} id */
async function verify(id) {
  const clean = id.trim().toLowerCase();
  if (!/^[0-9a-f]{40}$/.test(clean)) {
    show('A verification id is 40 characters, 0–9 and a–f.', null);
    return;
  }
  history.replaceState(null, '', `#id=${clean}`);
  try {
    const response = await fetch(`/api/verify/${clean}`, { cache: 'no-store', credentials: 'omit' });
    const body = await response.json();
    if (response.ok && body.valid) {
      show('Valid: this certificate of attendance was issued by ScrubIn.', body.certificate);
    } else if (response.status === 410) {
      show('This certificate has been revoked.', null);
    } else if (response.status === 429) {
      show('Too many checks from this address; try again in a minute.', null);
    } else {
      show('No certificate has this verification id.', null);
    }
  } catch {
    show('The server could not be reached; try again.', null);
  }
}

const form = /** @type {HTMLFormElement} */ ($('#verify-form'));
const input = /** @type {HTMLInputElement} */ ($('#verify-id'));
form.addEventListener('submit', (event) => {
  event.preventDefault();
  verify(input.value);
});
const fromLink = new URLSearchParams(location.hash.slice(1)).get('id');
if (fromLink) {
  input.value = fromLink;
  verify(fromLink);
}

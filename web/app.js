'use strict';
// Rookery web chat. The wire contract is docs/protocol.md. Every user-controlled string
// reaches the DOM through textContent only.

const TOKEN_KEY = 'rookery.token';
const CURRENT_KEY = 'rookery.current';
const REQUEST_TIMEOUT_MS = 15000;
const CONNECT_TIMEOUT_MS = 10000;
const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 15000;
// A frame over the server's limit (session.max_frame_bytes, 64 KiB) would close the
// connection; a body over the room's own limit is answered too_large.
const MAX_BODY_BYTES = 60 * 1024;
const HISTORY_PAGE = 50;
const GROUP_GAP_MS = 5 * 60 * 1000;
const TYPING_SEND_EVERY_MS = 2000;
const TYPING_SHOW_MS = 3000;
const FLASH_MS = 5000;
const NEAR_BOTTOM_PX = 80;
const MAX_NOTES = 100;
// The browser never tells a page that a link went silent, so an idle connection is probed.
const HEARTBEAT_EVERY_MS = 4000;
const HEARTBEAT_IDLE_MS = 8000;
const HEARTBEAT_TIMEOUT_MS = 6000;

const $ = (id) => document.getElementById(id);
const ui = {
  banner: $('banner'), login: $('login'), chat: $('chat'),
  username: $('username'), password: $('password'), loginBtn: $('login-btn'),
  registerBtn: $('register-btn'), authStatus: $('auth-status'),
  me: $('me'), logoutBtn: $('logout-btn'), sidebarToggle: $('sidebar-toggle'),
  rooms: $('rooms'), joinName: $('join-name'), joinBtn: $('join-btn'),
  createName: $('create-name'), createPrivate: $('create-private'),
  createMembers: $('create-members'), createBtn: $('create-btn'),
  dmUser: $('dm-user'), dmBtn: $('dm-btn'),
  roomTitle: $('room-title'), who: $('who'), inviteBox: $('invite-box'),
  inviteUser: $('invite-user'), inviteBtn: $('invite-btn'), revokeBtn: $('revoke-btn'),
  roomStatus: $('room-status'), messages: $('messages'), olderBtn: $('older-btn'),
  log: $('log'), typing: $('typing'), composer: $('composer'), sendBtn: $('send-btn'),
};

const state = {
  // connection
  ws: null, opened: false, session: null, authed: false, online: false, wasOnline: false,
  attempt: 0, reconnectTimer: 0, countdownTimer: 0, connectTimer: 0, flashTimer: 0,
  waiters: [], pending: new Map(), nextId: 0, lastFrameAt: 0, pingInFlight: false,
  loggingOut: false,
  // account
  token: storageGet(TOKEN_KEY), user: null,
  // rooms and messages
  current: null, rooms: new Map(), joined: new Set(), joining: new Map(),
  messages: new Map(), delivered: new Map(), notes: new Map(), locals: new Map(), unread: new Map(),
  hasMore: new Map(), historyLoaded: new Set(), historyLoading: new Map(),
  typing: new Map(), lastTypingAt: 0, whoTicket: 0,
  elCache: new Map(), cacheRoom: null,
};
const renderedSig = new WeakMap();

// ---------- small helpers ----------

function storageGet(key) {
  try { return sessionStorage.getItem(key); } catch { return null; }
}

function storageSet(key, value) {
  try {
    if (value == null) sessionStorage.removeItem(key); else sessionStorage.setItem(key, value);
  } catch { /* storage disabled: the session just does not survive a reload */ }
}

function rpcError(code, message, local = false) {
  const err = new Error(message);
  err.code = code;
  err.local = local;
  return err;
}

function describe(err) {
  if (!err) return 'unknown error';
  if (err.local || !err.code) return err.message || String(err);
  return `${err.code}: ${err.message}`;
}

function randomId() {
  if (typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

const pad2 = (n) => String(n).padStart(2, '0');
const hhmm = (date) => `${pad2(date.getHours())}:${pad2(date.getMinutes())}`;

function msgTime(m) {
  const t = Date.parse(m.sent_at);
  return Number.isFinite(t) ? t : (m.createdAt || 0);
}

const isDirect = (room) => room.startsWith('dm:');

function displayName(room) {
  if (!isDirect(room)) return room;
  const [, a = '', b = ''] = room.split(':');
  const me = (state.user || '').toLowerCase();
  return `@ ${a.toLowerCase() === me ? b : a}`;
}

function setStatus(node, text, isError = false) {
  node.textContent = text;
  node.classList.toggle('error', isError);
}

const setRoomStatus = (text, isError) => setStatus(ui.roomStatus, text, isError);
const setAuthStatus = (text, isError) => setStatus(ui.authStatus, text, isError);

// Disables the buttons for the duration of fn, so a double click sends one request.
async function withBusy(buttons, fn) {
  if (buttons.some((b) => b.disabled)) return undefined;
  for (const b of buttons) b.disabled = true;
  buttons[0].classList.add('busy');
  buttons[0].setAttribute('aria-busy', 'true');
  try {
    return await fn();
  } finally {
    for (const b of buttons) b.disabled = false;
    buttons[0].classList.remove('busy');
    buttons[0].removeAttribute('aria-busy');
  }
}

// ---------- banner ----------

function setBanner(name, text, { flash = false, hidden = name === 'online' && !flash } = {}) {
  clearTimeout(state.flashTimer);
  ui.banner.dataset.state = name;
  ui.banner.textContent = text;
  ui.banner.classList.toggle('flash', flash);
  ui.banner.hidden = hidden;
  if (flash) {
    state.flashTimer = setTimeout(() => {
      ui.banner.hidden = true;
      ui.banner.classList.remove('flash');
    }, FLASH_MS);
  }
}

function stopCountdown() {
  clearInterval(state.countdownTimer);
  state.countdownTimer = 0;
}

// ---------- connection ----------

function wsUrl() {
  return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
}

function connect() {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = 0;
  stopCountdown();
  if (state.ws) return;
  if (state.wasOnline) {
    setBanner('reconnecting', `Connection lost — reconnecting… (attempt ${Math.max(1, state.attempt)})`, { hidden: false });
  } else {
    setBanner('connecting', 'Connecting…', { hidden: false });
  }
  let ws;
  try {
    ws = new WebSocket(wsUrl());
  } catch {
    connectFailed(false);
    return;
  }
  state.ws = ws;
  state.opened = false;
  // WebSocket has no connect timeout of its own.
  state.connectTimer = setTimeout(() => {
    if (state.ws === ws && !state.opened) connectFailed(true);
  }, CONNECT_TIMEOUT_MS);
  ws.onopen = () => { if (state.ws === ws) onOpen(); };
  ws.onmessage = (ev) => { if (state.ws === ws) onFrame(ev.data); };
  ws.onclose = (ev) => { if (state.ws === ws) onClose(ev.code, ev.reason); };
}

// Forgets the socket at once: a close on a dead link may take minutes to be reported.
function teardown() {
  const ws = state.ws;
  if (ws) {
    ws.onopen = ws.onmessage = ws.onclose = null;
    try { ws.close(); } catch { /* already closed */ }
  }
  clearTimeout(state.connectTimer);
  Object.assign(state, { ws: null, opened: false, session: null, authed: false, online: false, pingInFlight: false });
  const pending = [...state.pending.values()];
  state.pending.clear();
  for (const p of pending) {
    clearTimeout(p.timer);
    p.reject(rpcError('disconnected', 'The connection was lost', true));
  }
}

function scheduleReconnect(textFor) {
  const delay = Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** Math.min(state.attempt, 20));
  state.attempt += 1;
  const until = Date.now() + delay;
  const bannerState = state.wasOnline ? 'reconnecting' : 'connecting';
  const tick = () => {
    const seconds = Math.max(1, Math.ceil((until - Date.now()) / 1000));
    setBanner(bannerState, textFor(seconds), { hidden: false });
  };
  stopCountdown();
  tick();
  state.countdownTimer = setInterval(tick, 500);
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = setTimeout(connect, delay);
}

function connectFailed(timedOut) {
  teardown();
  const what = `Could not reach the server${timedOut ? ' (timed out after 10 s)' : ''}`;
  settleWaiters(rpcError('unreachable', what, true));
  const prefix = state.wasOnline ? 'Connection lost — reconnecting… ' : '';
  scheduleReconnect((n) => `${prefix}${what} — retrying in ${n} s`);
}

function connectionLost() {
  scheduleReconnect((n) => (state.wasOnline
    ? `Connection lost — reconnecting… (in ${n} s)`
    : `Connection closed — retrying in ${n} s`));
}

// Not logged in and no socket: connect again when the user acts.
function idle(text = 'Not connected', visible = false) {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = 0;
  stopCountdown();
  setBanner('offline', text, { hidden: !visible });
}

function ensureConnected() {
  if (state.ws && state.opened) return Promise.resolve();
  return new Promise((resolve, reject) => {
    state.waiters.push({ resolve, reject });
    if (!state.ws) connect();
  });
}

function settleWaiters(err) {
  const waiters = state.waiters;
  state.waiters = [];
  for (const w of waiters) if (err) w.reject(err); else w.resolve();
}

function onOpen() {
  clearTimeout(state.connectTimer);
  state.opened = true;
  state.lastFrameAt = Date.now();
  if (state.token) {
    startSession();
  } else {
    state.attempt = 0;
    setBanner('online', 'Connected');
  }
  settleWaiters(null);
}

function onClose(code, reason) {
  const wasOpen = state.opened;
  teardown();
  if (state.loggingOut || (code === 1000 && reason === 'logged out')) {
    goToLogin('You have logged out.');
  } else if (code === 1008 && (reason === 'token revoked' || reason === 'token expired')) {
    goToLogin(`Logged out: ${reason} — please log in again`, true);
  } else if (reason === 'resumed on another connection') {
    // Reconnecting here would take the session back from the other tab, and so on forever.
    idle('This session was opened in another tab or window — click here to reconnect', true);
  } else if (!wasOpen) {
    connectFailed(false);
  } else if (state.token) {
    connectionLost();
  } else {
    idle();
  }
}

function onFrame(data) {
  state.lastFrameAt = Date.now();
  if (typeof data !== 'string') return;
  let frame;
  try { frame = JSON.parse(data); } catch { return; }
  if (!frame || typeof frame !== 'object') return;
  if (frame.type === 'ok' || frame.type === 'error') settle(frame);
  else onEvent(frame);
}

function request(type, fields = {}, timeoutMs = REQUEST_TIMEOUT_MS) {
  return new Promise((resolve, reject) => {
    const ws = state.ws;
    if (!ws || !state.opened) {
      reject(rpcError('disconnected', 'Not connected to the server — try again when back online', true));
      return;
    }
    state.nextId += 1;
    const id = `r${state.nextId}`;
    const timer = setTimeout(() => {
      state.pending.delete(id);
      reject(rpcError('timeout', `No reply from the server within ${timeoutMs / 1000} s`, true));
    }, timeoutMs);
    state.pending.set(id, { resolve, reject, timer });
    ws.send(JSON.stringify({ ...fields, id, type }));
  });
}

function settle(frame) {
  const waiting = state.pending.get(frame.id);
  if (!waiting) {
    if (frame.type === 'error') console.warn('rookery: server error', frame.code, frame.message);
    return;
  }
  state.pending.delete(frame.id);
  clearTimeout(waiting.timer);
  if (frame.type === 'ok') waiting.resolve(frame);
  else waiting.reject(rpcError(frame.code || 'error', frame.message || 'request failed'));
}

function heartbeat() {
  const ws = state.ws;
  if (!ws || !state.opened || !state.token || state.pingInFlight) return;
  if (Date.now() - state.lastFrameAt < HEARTBEAT_IDLE_MS) return;
  state.pingInFlight = true;
  request('ping', {}, HEARTBEAT_TIMEOUT_MS).then(() => {
    state.pingInFlight = false;
  }, (err) => {
    state.pingInFlight = false;
    if (err.code === 'timeout' && state.ws === ws) {
      teardown();
      connectionLost();
    }
  });
}

// ---------- session ----------

// Resume, then rejoin every room and resend the outbox, all pipelined behind the resume.
function startSession() {
  const ws = state.ws;
  const reconnecting = state.wasOnline;
  state.session = ws;
  setBanner(reconnecting ? 'reconnecting' : 'connecting',
    reconnecting ? 'Reconnected — catching up…' : 'Resuming your session…', { hidden: false });
  const resume = request('resume', { token: state.token });
  const rejoins = [...state.joined].map((room) => rejoin(room, ws));
  flushOutbox();
  resume.then((reply) => onResumed(ws, reply, rejoins, reconnecting), (err) => onResumeFailed(ws, err));
}

function rejoin(room, ws) {
  const after = lastSeq(room);
  return request('join', after > 0 ? { room, after } : { room })
    .then((reply) => applyJoin(room, reply))
    .catch((err) => {
      if (err.code === 'forbidden' || err.code === 'not_found') {
        state.joined.delete(room);
        setRoomStatus(`Could not rejoin ${displayName(room)}: ${describe(err)}`, true);
      } else if (err.code !== 'disconnected' && state.ws === ws) {
        // A refusal for now (rate_limited, unavailable, a timeout): the next connection tries
        // again, so the room is never left without its live events.
        teardown();
        connectionLost();
      }
      return 0;
    });
}

async function onResumed(ws, reply, rejoins, reconnecting) {
  if (state.ws !== ws) return;
  state.authed = true;
  if (typeof reply.user?.username === 'string') state.user = reply.user.username;
  state.attempt = 0;
  for (const room of Array.isArray(reply.rooms) ? reply.rooms : []) {
    if (typeof room?.name === 'string') state.joined.add(room.name);
  }
  showChat();
  refreshRooms();
  const counts = await Promise.all(rejoins);
  if (state.ws !== ws || !state.authed) return;
  state.online = true;
  state.wasOnline = true;
  const fetched = counts.reduce((sum, n) => sum + n, 0);
  if (reconnecting) setBanner('online', `Back online — ${fetched} missed messages fetched`, { flash: true });
  else setBanner('online', 'Connected');
  renderAll();
  const saved = storageGet(CURRENT_KEY);
  if (state.current) ensureRoomReady(state.current);
  else if (saved) switchRoom(saved);
}

function onResumeFailed(ws, err) {
  if (err.code === 'unauthorized') {
    goToLogin('Your session expired — please log in again', true);
  } else if (state.ws === ws) {
    teardown();
    scheduleReconnect((n) => `Could not resume the session (${describe(err)}) — retrying in ${n} s`);
  }
}

function onLoggedIn(reply) {
  state.token = reply.token;
  storageSet(TOKEN_KEY, reply.token);
  Object.assign(state, { user: reply.user.username, session: state.ws, authed: true, online: true, wasOnline: true, attempt: 0 });
  ui.password.value = '';
  setBanner('online', 'Connected');
  showChat();
  refreshRooms();
}

function resetRooms() {
  for (const users of state.typing.values()) for (const timer of users.values()) clearTimeout(timer);
  for (const key of ['rooms', 'joining', 'messages', 'delivered', 'notes', 'locals', 'unread', 'hasMore', 'historyLoading', 'typing', 'elCache']) {
    state[key] = new Map();
  }
  state.joined = new Set();
  state.historyLoaded = new Set();
  state.current = null;
  state.cacheRoom = null;
}

function goToLogin(message, isError = false) {
  if (state.authed) teardown();
  state.session = null;
  state.token = null;
  storageSet(TOKEN_KEY, null);
  storageSet(CURRENT_KEY, null);
  Object.assign(state, { user: null, loggingOut: false, wasOnline: false, online: false, attempt: 0 });
  resetRooms();
  if (state.ws) setBanner('online', 'Connected'); else idle();
  ui.password.value = '';
  ui.chat.hidden = true;
  ui.login.hidden = false;
  setAuthStatus(message, isError);
  setRoomStatus('');
  ui.who.replaceChildren();
  renderAll();
}

function showChat() {
  ui.login.hidden = true;
  ui.chat.hidden = false;
  renderAll();
}

// ---------- auth screen ----------

function readCredentials() {
  const username = ui.username.value.trim();
  const password = ui.password.value;
  if (!username || !password) {
    setAuthStatus('Enter a username and a password', true);
    return null;
  }
  return { username, password };
}

async function login(creds, retry = true) {
  await ensureConnected();
  try {
    onLoggedIn(await request('login', creds));
  } catch (err) {
    // The server closes idle unauthenticated connections; one fresh attempt covers that race.
    if (retry && err.code === 'disconnected') return login(creds, false);
    throw err;
  }
  return undefined;
}

function onLoginClick() {
  const creds = readCredentials();
  if (!creds) return;
  withBusy([ui.loginBtn, ui.registerBtn], async () => {
    setAuthStatus('Logging in…');
    try {
      await login(creds);
    } catch (err) {
      setAuthStatus(describe(err), true);
    }
  });
}

function onRegisterClick() {
  const creds = readCredentials();
  if (!creds) return;
  withBusy([ui.registerBtn, ui.loginBtn], async () => {
    setAuthStatus('Creating your account…');
    try {
      await ensureConnected();
      await request('register', creds);
    } catch (err) {
      setAuthStatus(describe(err), true);
      return;
    }
    setAuthStatus('Account created — now log in');
    try {
      await login(creds);
    } catch (err) {
      setAuthStatus(`Account created, but logging in failed: ${describe(err)}`, true);
    }
  });
}

function onLogoutClick() {
  withBusy([ui.logoutBtn], async () => {
    state.loggingOut = true;
    try {
      await request('logout');
      goToLogin('You have logged out.');
    } catch (err) {
      // Offline: forget the token here anyway; the server revokes nothing it never heard of.
      goToLogin(err.code === 'disconnected' ? 'Logged out on this device.' : 'You have logged out.');
    }
  });
}

// ---------- rooms ----------

function learnRoom(room) {
  if (!room || typeof room.name !== 'string') return;
  const known = state.rooms.get(room.name) || {};
  state.rooms.set(room.name, { name: room.name, kind: room.kind || known.kind });
}

async function refreshRooms() {
  try {
    const reply = await request('rooms');
    state.rooms = new Map();
    for (const room of reply.rooms || []) {
      learnRoom(room);
      if (room.joined) state.joined.add(room.name);
    }
    renderRooms();
    renderRoomHeader();
  } catch (err) {
    if (err.code !== 'disconnected') setRoomStatus(`Could not load the room list: ${describe(err)}`, true);
  }
}

function roomMessages(room) {
  let map = state.messages.get(room);
  if (!map) {
    map = new Map();
    state.messages.set(room, map);
  }
  return map;
}

// The highest seq of the room delivered by the server (events, missed, history, a join's
// last_seq): a rejoin asks for what came after it. Acks do not count: a send's ack may come
// before earlier messages of others.
function lastSeq(room) {
  return state.delivered.get(room) || 0;
}

function noteDelivered(room, seq) {
  if (Number.isSafeInteger(seq) && seq > lastSeq(room)) state.delivered.set(room, seq);
}

function lowestSeq(room) {
  let min = Infinity;
  for (const seq of roomMessages(room).keys()) if (seq < min) min = seq;
  return Number.isFinite(min) ? min : 0;
}

// Returns true when the message was not held yet.
function addMessage(m, { delivered = true } = {}) {
  const seq = Number(m?.seq);
  if (!m || typeof m.room !== 'string' || !Number.isSafeInteger(seq)) return false;
  if (delivered) noteDelivered(m.room, seq);
  const map = roomMessages(m.room);
  if (map.has(seq)) return false;
  const from = String(m.from ?? '');
  map.set(seq, { room: m.room, seq, from, body: m.body, sent_at: m.sent_at, client_msg_id: m.client_msg_id, error: m.error });
  if (m.client_msg_id && from === state.user) {
    const local = state.locals.get(m.client_msg_id);
    if (local && local.room === m.room) state.locals.delete(m.client_msg_id);
  }
  return true;
}

// Live and missed messages count as unread outside the current room; history pages do not.
function mergeMessages(room, list, countUnread = false) {
  let added = 0;
  for (const m of Array.isArray(list) ? list : []) {
    if (!addMessage(m)) continue;
    added += 1;
    if (countUnread && room !== state.current && m.from !== state.user) {
      state.unread.set(room, (state.unread.get(room) || 0) + 1);
    }
  }
  return added;
}

function applyJoin(room, reply) {
  state.joined.add(room);
  learnRoom(reply.room);
  const missed = Array.isArray(reply.missed) ? reply.missed : [];
  if (reply.truncated && missed.length) {
    // Keep the held messages contiguous; scrolling back refills the gap.
    const lowest = Math.min(...missed.map((m) => Number(m.seq)));
    const map = roomMessages(room);
    for (const seq of [...map.keys()]) if (seq < lowest) map.delete(seq);
    state.hasMore.set(room, true);
  }
  const added = mergeMessages(room, missed, true);
  noteDelivered(room, Number(reply.room?.last_seq));
  renderRooms();
  if (room === state.current) {
    renderRoomHeader();
    renderMessages();
  }
  return added;
}

function joinRoom(room) {
  let joining = state.joining.get(room);
  if (!joining) {
    const after = lastSeq(room);
    joining = request('join', after > 0 ? { room, after } : { room })
      .then((reply) => { applyJoin(room, reply); })
      .finally(() => state.joining.delete(room));
    state.joining.set(room, joining);
  }
  return joining;
}

function loadHistory(room) {
  let loading = state.historyLoading.get(room);
  if (!loading) {
    loading = request('history', { room, limit: HISTORY_PAGE })
      .then((reply) => {
        mergeMessages(room, reply.messages);
        state.hasMore.set(room, Boolean(reply.has_more));
        state.historyLoaded.add(room);
        if (room === state.current) renderMessages({ bottom: true });
      })
      .finally(() => state.historyLoading.delete(room));
    state.historyLoading.set(room, loading);
  }
  return loading;
}

function loadOlder() {
  const room = state.current;
  if (!room) return;
  withBusy([ui.olderBtn], async () => {
    try {
      if (!state.historyLoaded.has(room)) {
        await loadHistory(room);
        return;
      }
      const reply = await request('history', { room, before: lowestSeq(room), limit: HISTORY_PAGE });
      mergeMessages(room, reply.messages);
      state.hasMore.set(room, Boolean(reply.has_more));
      if (state.current === room) renderMessages({ keepOffset: true });
    } catch (err) {
      if (state.current === room) setRoomStatus(`Could not load older messages: ${describe(err)}`, true);
    }
  });
}

async function refreshWho(room) {
  state.whoTicket += 1;
  const ticket = state.whoTicket;
  try {
    const reply = await request('who', { room });
    if (state.current !== room || ticket !== state.whoTicket) return;
    const online = Array.isArray(reply.online) ? reply.online : [];
    ui.who.replaceChildren(...online.map((user) => make('li', user === state.user ? 'me' : '', user)));
  } catch { /* the online list is a nicety; other requests report real trouble */ }
}

async function switchRoom(room) {
  if (!room) return;
  if (state.current !== room) {
    setRoomStatus('');
    ui.who.replaceChildren();
  }
  state.current = room;
  storageSet(CURRENT_KEY, room);
  state.unread.delete(room);
  renderRooms();
  renderRoomHeader();
  renderTyping();
  renderMessages({ bottom: true });
  if (window.matchMedia('(min-width: 641px)').matches) ui.composer.focus({ preventScroll: true });
  await ensureRoomReady(room);
}

// Joins the room and loads its newest page when that has not happened yet (or was cut off).
async function ensureRoomReady(room) {
  try {
    if (!state.joined.has(room)) await joinRoom(room);
    if (!state.historyLoaded.has(room)) await loadHistory(room);
    if (state.current === room) refreshWho(room);
  } catch (err) {
    if (state.current === room) setRoomStatus(`${displayName(room)}: ${describe(err)}`, true);
  }
}

// ---------- sidebar and room actions ----------

function onJoinClick() {
  const room = ui.joinName.value.trim().replace(/^#/, '');
  if (!room) {
    setRoomStatus('Type the name of a room to join', true);
    return;
  }
  withBusy([ui.joinBtn], async () => {
    try {
      await joinRoom(room);
      ui.joinName.value = '';
      refreshRooms();
      switchRoom(room);
    } catch (err) {
      setRoomStatus(`Could not join ${room}: ${describe(err)}`, true);
    }
  });
}

function onCreateClick() {
  const room = ui.createName.value.trim().replace(/^#/, '');
  if (!room) {
    setRoomStatus('Type a name for the new room', true);
    return;
  }
  const isPrivate = ui.createPrivate.checked;
  const members = ui.createMembers.value.split(/[\s,]+/).filter(Boolean);
  withBusy([ui.createBtn], async () => {
    try {
      const reply = await request('create_room', isPrivate ? { room, kind: 'private', members } : { room, kind: 'public' });
      learnRoom(reply.room);
      const name = reply.room?.name || room;
      ui.createName.value = '';
      ui.createMembers.value = '';
      ui.createPrivate.checked = false;
      await joinRoom(name);
      refreshRooms();
      switchRoom(name);
      setRoomStatus(`Created the ${isPrivate ? 'private' : 'public'} room ${name}`);
    } catch (err) {
      setRoomStatus(`Could not create ${room}: ${describe(err)}`, true);
    }
  });
}

function onDmClick() {
  const user = ui.dmUser.value.trim();
  if (!user) {
    setRoomStatus('Type the username to message', true);
    return;
  }
  withBusy([ui.dmBtn], async () => {
    try {
      const reply = await request('dm', { user });
      learnRoom(reply.room);
      await joinRoom(reply.room.name);
      ui.dmUser.value = '';
      refreshRooms();
      switchRoom(reply.room.name);
    } catch (err) {
      setRoomStatus(`Could not open a conversation with ${user}: ${describe(err)}`, true);
    }
  });
}

function onMemberAction(action) {
  const room = state.current;
  const user = ui.inviteUser.value.trim();
  if (!room || !user) {
    setRoomStatus('Type a username first', true);
    return;
  }
  const button = action === 'invite' ? ui.inviteBtn : ui.revokeBtn;
  withBusy([button], async () => {
    try {
      await request(action, { room, user });
      ui.inviteUser.value = '';
      setRoomStatus(action === 'invite' ? `Invited ${user} to ${room}` : `Removed ${user} from ${room}`);
      if (action === 'revoke' && state.current === room) refreshWho(room);
    } catch (err) {
      setRoomStatus(`Could not ${action === 'invite' ? 'invite' : 'remove'} ${user}: ${describe(err)}`, true);
    }
  });
}

// ---------- sending ----------

const canSend = () => Boolean(state.ws && state.opened && state.session === state.ws);
const outboxCount = () => [...state.locals.values()].filter((l) => l.status === 'pending').length;

function onSendClick() {
  const body = ui.composer.value;
  if (!body.trim()) return;
  const room = state.current;
  if (!room) {
    setRoomStatus('Pick a room first', true);
    return;
  }
  const bytes = new TextEncoder().encode(body).length;
  if (bytes > MAX_BODY_BYTES) {
    setRoomStatus(`Message too long: ${bytes} bytes, the limit is ${MAX_BODY_BYTES} bytes. Shorten it and send again.`, true);
    return;
  }
  const local = {
    room, body, client_msg_id: randomId(), from: state.user, createdAt: Date.now(),
    status: 'pending', failure: '', inFlight: false,
  };
  state.locals.set(local.client_msg_id, local);
  ui.composer.value = '';
  fitComposer();
  renderMessages({ bottom: true });
  trySend(local);
}

// Retries always carry the same client_msg_id, so the server stores the message once.
function trySend(local) {
  if (local.status !== 'pending' || local.inFlight || !canSend()) return;
  if (state.locals.get(local.client_msg_id) !== local) return;
  // One message in flight per room, oldest first: a retry is never stored after a later one.
  const first = [...state.locals.values()].find((l) => l.room === local.room && l.status === 'pending');
  if (first !== local) return;
  local.inFlight = true;
  request('send', { room: local.room, body: local.body, client_msg_id: local.client_msg_id })
    .then((reply) => {
      local.inFlight = false;
      onSendAck(local, reply);
    }, (err) => {
      local.inFlight = false;
      onSendError(local, err);
    });
}

function onSendAck(local, reply) {
  state.locals.delete(local.client_msg_id);
  addMessage({
    room: local.room, seq: reply.seq, from: state.user, body: local.body,
    sent_at: reply.sent_at, client_msg_id: local.client_msg_id,
  }, { delivered: false });
  if (local.room === state.current) renderMessages();
  flushOutbox();
}

function onSendError(local, err) {
  if (state.locals.get(local.client_msg_id) !== local) return;
  if (err.code === 'rate_limited') {
    setTimeout(() => trySend(local), 1000);
  } else if (err.code === 'unavailable' || err.code === 'timeout') {
    setTimeout(() => trySend(local), 2000);
  } else if (err.code !== 'disconnected' && err.code !== 'unauthorized') {
    local.status = 'failed';
    local.failure = describe(err);
    if (local.room === state.current) renderMessages();
    flushOutbox();
  }
  // disconnected / unauthorized: the outbox is sent again right after the next resume.
}

function flushOutbox() {
  for (const local of [...state.locals.values()]) trySend(local);
}

function fitComposer() {
  ui.composer.rows = Math.min(6, Math.max(1, ui.composer.value.split('\n').length));
}

function onComposerInput() {
  fitComposer();
  const room = state.current;
  if (!room || !ui.composer.value.trim() || !state.joined.has(room) || !state.authed) return;
  const now = Date.now();
  if (now - state.lastTypingAt < TYPING_SEND_EVERY_MS) return;
  state.lastTypingAt = now;
  request('typing', { room }).catch(() => { /* best effort: rate_limited and the like are ignored */ });
}

// ---------- events ----------

function onEvent(ev) {
  switch (ev.type) {
    case 'message': onMessageEvent(ev); break;
    case 'joined':
    case 'left': onPresence(ev); break;
    case 'typing': onTypingEvent(ev); break;
    case 'kicked': onKicked(ev); break;
    default: break; // events this client does not know are ignored
  }
}

function onMessageEvent(m) {
  const added = mergeMessages(m.room, [m], true);
  stopTyping(m.room, m.from);
  if (!added) return;
  if (m.room === state.current) renderMessages();
  else renderRooms();
}

function addNote(room, text) {
  const notes = state.notes.get(room) || [];
  notes.push({ text, afterSeq: lastSeq(room) });
  if (notes.length > MAX_NOTES) notes.shift();
  state.notes.set(room, notes);
}

function onPresence(ev) {
  if (typeof ev.room !== 'string') return;
  addNote(ev.room, `${ev.user} ${ev.type === 'joined' ? 'joined' : 'left'}`);
  if (ev.type === 'left') stopTyping(ev.room, ev.user);
  if (ev.room === state.current) {
    refreshWho(ev.room);
    renderMessages();
  }
}

function onTypingEvent(ev) {
  if (ev.user === state.user || typeof ev.room !== 'string') return;
  let users = state.typing.get(ev.room);
  if (!users) {
    users = new Map();
    state.typing.set(ev.room, users);
  }
  clearTimeout(users.get(ev.user));
  users.set(ev.user, setTimeout(() => stopTyping(ev.room, ev.user), TYPING_SHOW_MS));
  if (ev.room === state.current) renderTyping();
}

function stopTyping(room, user) {
  const users = state.typing.get(room);
  if (!users || !users.has(user)) return;
  clearTimeout(users.get(user));
  users.delete(user);
  if (room === state.current) renderTyping();
}

function onKicked(ev) {
  state.joined.delete(ev.room);
  setRoomStatus(`You were removed from ${ev.room} (${ev.reason})`, true);
  if (ev.room === state.current) ui.who.replaceChildren();
  renderRooms();
  refreshRooms();
}

// ---------- rendering ----------

function renderAll() {
  ui.me.textContent = state.user || '';
  renderRooms();
  renderRoomHeader();
  renderTyping();
  renderMessages();
}

function renderRooms() {
  const names = new Set([...state.rooms.keys(), ...state.joined]);
  if (state.current) names.add(state.current);
  const sorted = [...names].sort((a, b) => (Number(isDirect(a)) - Number(isDirect(b)))
    || displayName(a).localeCompare(displayName(b)));
  ui.rooms.replaceChildren(...sorted.map(roomItem));
}

function roomItem(room) {
  const li = make('li');
  li.dataset.room = room;
  li.tabIndex = 0;
  const kind = isDirect(room) ? 'direct' : (state.rooms.get(room)?.kind === 'private' ? 'private' : 'public');
  li.classList.add(kind);
  if (room === state.current) {
    li.classList.add('current');
    li.setAttribute('aria-current', 'true');
  }
  if (state.joined.has(room)) li.classList.add('joined');
  const count = state.unread.get(room) || 0;
  const badge = make('span', 'unread', String(count));
  badge.hidden = count === 0;
  badge.title = `${count} unread`;
  li.append(make('span', 'name', displayName(room)), badge);
  return li;
}

function renderRoomHeader() {
  const room = state.current;
  ui.roomTitle.textContent = room ? displayName(room) : 'No room selected';
  const kind = room ? (isDirect(room) ? 'direct' : state.rooms.get(room)?.kind || '') : '';
  ui.roomTitle.dataset.kind = kind;
  ui.inviteBox.hidden = kind !== 'private';
  ui.composer.disabled = !room;
  ui.sendBtn.disabled = !room;
}

function renderTyping() {
  const users = [...(state.typing.get(state.current)?.keys() ?? [])];
  ui.typing.textContent = users.length
    ? `${users.join(', ')} ${users.length === 1 ? 'is' : 'are'} typing…`
    : '';
}

function renderMessages({ bottom = false, keepOffset = false } = {}) {
  const pane = ui.messages;
  const nearBottom = pane.scrollHeight - pane.scrollTop - pane.clientHeight < NEAR_BOTTOM_PX;
  const fromBottom = pane.scrollHeight - pane.scrollTop;
  const top = pane.scrollTop;
  const room = state.current;
  if (state.cacheRoom !== room) {
    state.elCache = new Map();
    state.cacheRoom = room;
  }
  ui.olderBtn.hidden = !(room && state.historyLoaded.has(room) && state.hasMore.get(room));
  if (!room) {
    ui.log.replaceChildren(make('p', 'placeholder', 'Pick a room from the list, or join one by name.'));
    return;
  }
  ui.log.replaceChildren(...buildLog(room));
  if (keepOffset) pane.scrollTop = pane.scrollHeight - fromBottom;
  else if (bottom || nearBottom) pane.scrollTop = pane.scrollHeight;
  else pane.scrollTop = top;
}

function buildLog(room) {
  const map = roomMessages(room);
  const seqs = [...map.keys()].sort((a, b) => a - b);
  const notes = state.notes.get(room) || [];
  const locals = [...state.locals.values()].filter((l) => l.room === room);
  const nodes = [];
  const cache = new Map();
  let group = null;
  let next = 0;
  const pushNote = (note) => {
    nodes.push(make('div', 'sys', note.text));
    group = null;
  };
  const pushMessage = (m) => {
    const t = msgTime(m);
    if (!group || group.from !== m.from || t - group.last > GROUP_GAP_MS) {
      group = newGroup(m.from, t);
      nodes.push(group.el);
    }
    group.last = t;
    group.list.append(messageElement(m, t, cache));
  };
  for (const seq of seqs) {
    while (next < notes.length && notes[next].afterSeq < seq) pushNote(notes[next++]);
    pushMessage(map.get(seq));
  }
  while (next < notes.length) pushNote(notes[next++]);
  for (const local of locals) pushMessage(local);
  state.elCache = cache;
  if (!nodes.length) {
    nodes.push(make('p', 'placeholder', state.historyLoaded.has(room) ? 'No messages yet — say hello!' : 'Loading messages…'));
  }
  return nodes;
}

function newGroup(from, t) {
  const el = make('div', from === state.user ? 'group mine' : 'group');
  el.dataset.from = from;
  const time = make('time', 'time', hhmm(new Date(t)));
  time.dateTime = new Date(t).toISOString();
  const meta = make('div', 'meta');
  meta.append(make('span', 'from', from), ' ', time);
  const list = make('div', 'bubbles');
  el.append(meta, list);
  return { el, list, from, last: t };
}

// Elements are reused across renders so a pending message stays the same node once acked.
function messageElement(m, t, cache) {
  const mine = m.from === state.user;
  const key = mine && m.client_msg_id ? `c:${m.client_msg_id}` : `s:${m.seq}`;
  const node = state.elCache.get(key) || make('div');
  cache.set(key, node);
  const sig = `${m.seq}|${m.status}|${m.failure}|${mine}`;
  if (renderedSig.get(node) === sig) return node;
  renderedSig.set(node, sig);
  const pending = m.status === 'pending';
  const failed = m.status === 'failed';
  node.className = ['msg', mine && 'mine', pending && 'pending', failed && 'failed'].filter(Boolean).join(' ');
  node.dataset.room = m.room;
  node.dataset.from = m.from;
  if (m.seq != null) node.dataset.seq = String(m.seq); else delete node.dataset.seq;
  if (m.client_msg_id) node.dataset.clientMsgId = m.client_msg_id; else delete node.dataset.clientMsgId;
  node.title = `${new Date(t).toLocaleString()}${pending ? ' — sending…' : ''}`;
  const body = make('div', 'body');
  if (typeof m.body === 'string' && m.error !== 'undecryptable') {
    body.textContent = m.body;
  } else {
    body.classList.add('undecryptable');
    body.textContent = 'message could not be decrypted';
  }
  node.replaceChildren(body);
  if (failed) node.append(make('div', 'error', m.failure));
  return node;
}

// ---------- wiring ----------

function onEnter(input, action) {
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.isComposing) {
      e.preventDefault();
      action();
    }
  });
}

function bindEvents() {
  // Never submitted: the buttons do the work (and the CSP forbids form actions anyway).
  $('auth-form').addEventListener('submit', (e) => e.preventDefault());
  ui.loginBtn.addEventListener('click', onLoginClick);
  ui.registerBtn.addEventListener('click', onRegisterClick);
  onEnter(ui.username, onLoginClick);
  onEnter(ui.password, onLoginClick);
  for (const input of [ui.username, ui.password]) {
    input.addEventListener('focus', () => {
      if (!state.ws && !state.reconnectTimer && !state.token) connect();
    });
  }
  ui.logoutBtn.addEventListener('click', onLogoutClick);
  ui.sidebarToggle.addEventListener('click', () => {
    const collapsed = ui.chat.classList.toggle('sidebar-collapsed');
    ui.sidebarToggle.setAttribute('aria-expanded', String(!collapsed));
  });
  ui.rooms.addEventListener('click', (e) => {
    const li = e.target.closest('li[data-room]');
    if (li) switchRoom(li.dataset.room);
  });
  ui.rooms.addEventListener('keydown', (e) => {
    const li = e.target.closest('li[data-room]');
    if (li && (e.key === 'Enter' || e.key === ' ')) {
      e.preventDefault();
      switchRoom(li.dataset.room);
    }
  });
  ui.joinBtn.addEventListener('click', onJoinClick);
  onEnter(ui.joinName, onJoinClick);
  ui.createBtn.addEventListener('click', onCreateClick);
  onEnter(ui.createName, onCreateClick);
  ui.dmBtn.addEventListener('click', onDmClick);
  onEnter(ui.dmUser, onDmClick);
  ui.inviteBtn.addEventListener('click', () => onMemberAction('invite'));
  ui.revokeBtn.addEventListener('click', () => onMemberAction('revoke'));
  ui.olderBtn.addEventListener('click', loadOlder);
  ui.messages.addEventListener('scroll', () => {
    const pane = ui.messages;
    if (pane.scrollTop < 40 && pane.scrollHeight > pane.clientHeight && !ui.olderBtn.hidden && !ui.olderBtn.disabled) loadOlder();
  });
  ui.sendBtn.addEventListener('click', onSendClick);
  ui.composer.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      onSendClick();
    }
  });
  ui.composer.addEventListener('input', onComposerInput);
  ui.banner.addEventListener('click', () => {
    if (ui.banner.dataset.state === 'offline' && !state.ws) connect();
  });
  window.addEventListener('online', () => {
    if (state.reconnectTimer) connect();
  });
  window.addEventListener('offline', () => {
    if (state.ws && state.opened && state.token) {
      teardown();
      connectionLost();
    }
  });
}

function exposeForTests() {
  const api = Object.freeze({
    state: () => ({
      connected: Boolean(state.online && state.ws && state.opened),
      user: state.user,
      current: state.current,
      joined: [...state.joined],
      outbox: outboxCount(),
    }),
  });
  Object.defineProperty(window, 'rookery', { value: api, writable: false, configurable: false, enumerable: true });
}

function boot() {
  bindEvents();
  exposeForTests();
  renderAll();
  if (state.token) setAuthStatus('Resuming your session…');
  connect();
  setInterval(heartbeat, HEARTBEAT_EVERY_MS);
}

boot();

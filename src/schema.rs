// @generated automatically by Diesel CLI.

diesel::table! {
    messages (id) {
        id -> Int8,
        room_id -> Int8,
        seq -> Int8,
        sender_id -> Int8,
        client_msg_id -> Nullable<Text>,
        key_id -> Int4,
        nonce -> Bytea,
        ciphertext -> Bytea,
        created_at -> Timestamptz,
        aad_version -> Int2,
    }
}

diesel::table! {
    message_keys (key_id) {
        key_id -> Int4,
        check_value -> Nullable<Bytea>,
        recorded_at -> Timestamptz,
    }
}

diesel::table! {
    room_members (room_id, user_id) {
        room_id -> Int8,
        user_id -> Int8,
        added_at -> Timestamptz,
    }
}

diesel::table! {
    rooms (id) {
        id -> Int8,
        name -> Text,
        kind -> Text,
        owner_id -> Nullable<Int8>,
        last_seq -> Int8,
        created_at -> Timestamptz,
        origin -> Text,
        closed_at -> Nullable<Timestamptz>,
        purged_through -> Int8,
    }
}

diesel::table! {
    session_tokens (id) {
        id -> Int8,
        user_id -> Int8,
        token_hash -> Bytea,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    unstored_seqs (room_id, first_seq) {
        room_id -> Int8,
        first_seq -> Int8,
        last_seq -> Int8,
    }
}

diesel::table! {
    users (id) {
        id -> Int8,
        username -> Text,
        password_hash -> Text,
        created_at -> Timestamptz,
        disabled_at -> Nullable<Timestamptz>,
    }
}

diesel::joinable!(messages -> rooms (room_id));
diesel::joinable!(messages -> users (sender_id));
diesel::joinable!(room_members -> rooms (room_id));
diesel::joinable!(room_members -> users (user_id));
diesel::joinable!(rooms -> users (owner_id));
diesel::joinable!(session_tokens -> users (user_id));
diesel::joinable!(unstored_seqs -> rooms (room_id));

diesel::allow_tables_to_appear_in_same_query!(
    message_keys,
    messages,
    room_members,
    rooms,
    session_tokens,
    unstored_seqs,
    users,
);
